"""What the precision plugins do to the models inside a LightningModule, besides quantizing them:
find them, keep their frozen weights in the compute dtype, and report a low-memory load's layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_qlora.core.quant_error import LayerError
from lightning_qlora.core.quantize import QuantReport, quantized_nbytes


def find_models(module: nn.Module) -> dict[str, nn.Module]:
    """The outermost transformers models inside ``module`` by attribute path; else ``module`` itself."""
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return {"": module}
    found: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(name.startswith(p + ".") for p in found):
            found[name] = sub
    return found or {"": module}


def cast_frozen(model: nn.Module, dtype: torch.dtype, keep_norms: bool = True, from_any: bool = False) -> None:
    """Keep frozen float weights (embeddings, heads) in ``dtype``, the 16-bit compute dtype.

    Norms stay fp32 and trainable weights keep fp32 master copies; on CPU the compute
    dtype is fp32 and nothing changes. ``from_any`` casts frozen weights of every float
    dtype, not only fp32 (FSDP needs one dtype per unit).
    """
    if dtype == torch.float32 and not from_any:
        return
    for module in model.modules():
        if keep_norms and "norm" in type(module).__name__.lower():
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad or type(param) is not nn.Parameter or not param.is_floating_point():
                continue
            if param.dtype != dtype and (from_any or param.dtype == torch.float32):
                param.data = param.data.to(dtype)


def adopt_loaded(report: QuantReport, errors: list[LayerError], model: nn.Module) -> None:
    """Fill ``report`` with the layers quantized while loading (``low_memory``), as if quantized here."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    errors.sort(key=lambda e: order.get(e.name, len(order)))  # file order -> model order
    for error in errors:
        report.quantized.append(error.name)
        report.bytes_before += error.numel * 4  # lowmem reads every weight as fp32
        report.bytes_after += quantized_nbytes(model.get_submodule(error.name))
    report.already_quantized = [n for n in report.already_quantized if n not in set(report.quantized)]


def chain(*hooks: Callable[[str, torch.Tensor, nn.Module], None] | None) -> Callable[..., None]:
    """One ``on_layer`` hook calling each given (non-None) hook in turn."""
    live = [h for h in hooks if h is not None]

    def call(name: str, weight: torch.Tensor, layer: nn.Module) -> None:
        for hook in live:
            hook(name, weight, layer)

    return call
