"""LoftQ initialization: start the adapters at the best rank-r fix of the quantization error.

Plain QLoRA starts with ``B = 0``, so the model begins as ``dequant(quant(W))`` and
the adapters must first learn back what 4 bits lost. LoftQ (Li et al. 2023) instead
sets ``scale * B @ A`` to the rank-r SVD of the residual ``W - dequant(quant(W))``.
This is the one-step variant (as in PEFT's ``replace_lora_weights_loftq``): the base
keeps the usual quantization, so checkpoints, export and merge work unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_qlora.core.quantize import dequantized_weight


class LoftQInit:
    """Collect each layer's low-rank residual during quantization, then write it into the adapters.

    Args:
        r: The LoRA rank.
    """

    def __init__(self, r: int) -> None:
        self.r = r
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name: str, weight: torch.Tensor, layer: nn.Module) -> None:
        """``quantize_model``'s ``on_layer`` hook: keep the rank-r factors of this layer's residual."""
        import bitsandbytes as bnb

        if not isinstance(layer, bnb.nn.Linear4bit):
            raise ValueError("adapter.init='loftq' needs a 4-bit quant_type (nf4 or fp4); int8 is not supported.")
        dense = dequantized_weight(layer)
        residual = weight.detach().float().to(dense.device).reshape(dense.shape) - dense
        rank = min(self.r, *residual.shape)
        # A randomized SVD is exact enough at rank r and ~10x faster than a full one on CPU.
        u, s, v = torch.svd_lowrank(residual, q=min(rank + 8, *residual.shape), niter=4)
        root = s[:rank].sqrt()
        self.factors[name] = (u[:, :rank] * root, root[:, None] * v[:, :rank].T)  # B: out x r, A: r x in

    def apply(self, model: nn.Module, adapter_name: str = "default") -> int:
        """Set ``lora_B``/``lora_A`` of every collected layer so that ``scale * B @ A`` is its residual."""
        done = 0
        for name, (b, a) in self.factors.items():
            layer = model.get_submodule(name)
            if not hasattr(layer, "lora_A") or adapter_name not in layer.lora_A:
                continue  # quantized but not adapted (e.g. outside target_modules)
            root_scale = math.sqrt(layer.scaling[adapter_name])
            with torch.no_grad():
                layer.lora_A[adapter_name].weight.copy_(a / root_scale)
                layer.lora_B[adapter_name].weight.copy_(b / root_scale)
            done += 1
        self.factors.clear()
        return done
