"""The Lightning layer: the QLoRA precision plugins, the FSDP strategy, callbacks (adapters, faults)
and adapter-only checkpoints.

May import: ``lightning_qlora.core``, ``.cpu`` (through its one entry point), ``.io``.
"""
