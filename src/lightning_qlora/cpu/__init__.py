"""The CPU fast path: allocator policy, checkpoint-recompute reuse, replayed dropout masks and the
LoRA layer without PEFT's copy of the base output.

Entered through one options object and one function::

    from lightning_qlora.cpu import CPUOptions, apply

    apply(peft_model, CPUOptions(fast_dropout=False))   # once the adapters exist

Training loops that also want the heap trimmed between steps hold a :class:`CPUFastPath`
(``QLoRAPlugin(cpu=CPUOptions(...))`` does). The submodules are internals.

May import: ``lightning_qlora.core``; never Lightning.
"""

from lightning_qlora.cpu.fastpath import CPUFastPath, CPUReport, apply
from lightning_qlora.cpu.options import CPUOptions, options_from_aliases

__all__ = ["CPUFastPath", "CPUOptions", "CPUReport", "apply", "options_from_aliases"]
