"""PEFT's LoRA wrapper of a 4-bit layer, without its defensive copy of the base output on CPU.

PEFT's ``lora.bnb.Linear4bit.forward`` clones the base layer's output before adding the LoRA
term ("defensively", for an old autograd problem with views). The sum that follows is out of
place, so the copy is never needed, yet it costs a copy of every layer's output, twice a step under
checkpointing (``bench/README.md``). ``LoRALinear4bit`` runs the plain single-adapter case without it, with the same
operations otherwise, so the results are the same bit for bit (``tests/cpu/test_lora_nocopy.py``).
Everything else (merged or disabled adapters, mixed batches, DoRA and other variants, GPUs) goes
to PEFT's own forward.
"""

from __future__ import annotations

from typing import Any

import torch

_CLASS: type | None = None


def lora_linear4bit() -> type:
    """``LoRALinear4bit``, a subclass of ``peft.tuners.lora.bnb.Linear4bit`` built on first use."""
    global _CLASS
    if _CLASS is None:
        from peft.tuners.lora.bnb import Linear4bit

        class LoRALinear4bit(Linear4bit):
            """``peft.tuners.lora.bnb.Linear4bit`` that adds the LoRA term to the base output uncopied on CPU."""

            def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if args or kwargs or x.device.type != "cpu" or self.disable_adapters or self.merged:
                    return super().forward(x, *args, **kwargs)
                if getattr(self, "lora_variant", None) or any(getattr(self, "use_dora", {}).values()):
                    return super().forward(x, *args, **kwargs)
                result = self.base_layer(x)
                convert = not torch.is_autocast_enabled()  # PEFT's test, for the same casts
                for name in self.active_adapters:
                    if name not in self.lora_A:
                        continue
                    lora_a = self.lora_A[name]
                    if convert:
                        x = self._cast_input_dtype(x, lora_a.weight.dtype)
                    output = self.lora_B[name](lora_a(self.lora_dropout[name](x))) * self.scaling[name]
                    result = result + (output.to(result.dtype) if convert else output)
                return result

        LoRALinear4bit.__module__ = __name__
        LoRALinear4bit.__qualname__ = "LoRALinear4bit"
        _CLASS = LoRALinear4bit
    return _CLASS


def __getattr__(name: str) -> Any:
    # Lets pickle find the lazily built class.
    if name == "LoRALinear4bit":
        return lora_linear4bit()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
