"""The CPU fast path: allocator policy, checkpoint-recompute reuse, replayed dropout masks and the
LoRA layer without PEFT's copy of the base output.

May import: ``lightning_qlora.core``; never Lightning.
"""
