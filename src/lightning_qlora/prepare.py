"""``prepare``: QLoRA in one call, without Lightning."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_qlora.core.adapters import ALL_LINEAR, AdapterConfig, add_adapters
from lightning_qlora.core.quantize import QuantConfig, quantize_model
from lightning_qlora.cpu import CPUOptions, apply, options_from_aliases

_BITS = {4: "nf4", 8: "int8"}
# The keywords prepare took before CPUOptions, and the field each one sets.
_CPU_ALIASES = {"reuse_recompute": "reuse_recompute", "fast_dropout": "fast_dropout"}


def prepare(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    modules_to_save: Sequence[str] = (),
    bits: int = 4,
    quant_type: str | None = None,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
    quant_storage: str | torch.dtype = "uint8",
    skip_modules: Sequence[str] = (),
    gradient_checkpointing: bool | int = True,
    device: torch.device | str | None = None,
    cpu: CPUOptions | None = None,
    verbose: bool = True,
    **deprecated: Any,
):
    """Quantize ``model``'s frozen base and add LoRA adapters, in place.

    Example::

        model = AutoModelForCausalLM.from_pretrained(path)
        peft_model = prepare(model, r=16, bits=4)   # NF4 + double quant, LoRA on all linear layers
        ...train model (or peft_model)...
        peft_model.save_pretrained("adapter/")      # standard PEFT format

    Args:
        model: The model to prepare; its layers are replaced in place.
        bits: 4 (NF4 unless ``quant_type`` says ``"fp4"``) or 8 (LLM.int8()).
        device: Where to quantize; defaults to where the weights are. With ``compute_dtype="auto"``
            the 4-bit layers pick their compute dtype where they run, so a model prepared on CPU
            and then moved with ``.cuda()`` computes in bf16 (fp16 on GPUs without bf16 units).
        cpu: The CPU fast path (:class:`~lightning_qlora.CPUOptions`), applied once the adapters
            exist (:func:`lightning_qlora.cpu.apply`). ``release_memory`` and ``mmap_threshold``
            act here only at setup; the heap trim after each step needs ``QLoRAPlugin``. The
            keywords ``reuse_recompute`` and ``fast_dropout`` are deprecated aliases of its fields.
        verbose: Print what was quantized and the trainable parameter count.
        Others: as in :class:`~lightning_qlora.core.quantize.QuantConfig` and
            :class:`~lightning_qlora.core.adapters.AdapterConfig`.

    Returns:
        The ``PeftModel`` wrapping ``model``.
    """
    cpu = options_from_aliases(cpu, deprecated, _CPU_ALIASES, "prepare")
    if bits not in _BITS:
        raise ValueError(f"bits={bits!r} is not supported; use bits=4 or bits=8.")
    quant_type = quant_type or _BITS[bits]
    if (bits == 8) != (quant_type == "int8"):
        raise ValueError(f"bits={bits} does not fit quant_type={quant_type!r}; use bits=8 only with 'int8'.")
    quant = QuantConfig(quant_type, double_quant, compute_dtype, quant_storage, tuple(skip_modules))
    adapters = AdapterConfig(r, alpha, dropout, target_modules, tuple(modules_to_save), gradient_checkpointing)
    quant_report = quantize_model(model, quant, device)
    if quant.compute_dtype == "auto":
        follow_device(model, quant)
    peft_model, adapter_report = add_adapters(model, adapters)
    apply(model, cpu)
    if verbose:
        print(quant_report.summary())
        print(adapter_report.summary())
    return peft_model


def follow_device(model: nn.Module, config: QuantConfig) -> int:
    """Let ``model``'s 4-bit layers resolve ``compute_dtype="auto"`` on the device they run on.

    ``quantize_model`` fixes the compute dtype for the device it quantized on; a model prepared
    on CPU and moved to a GPU afterwards would otherwise keep computing in fp32 there.

    Returns:
        The number of layers that now follow their device.
    """
    from lightning_qlora.core.bnb import require_bitsandbytes

    bnb = require_bitsandbytes()
    hook = functools.partial(_resolve_on_device, config)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer._compute_device = layer.weight.device.type  # what its compute dtype was resolved for
        layer.register_forward_pre_hook(hook)
    return len(layers)


def _resolve_on_device(config: QuantConfig, layer: nn.Module, args: tuple) -> None:
    # A module-level function (bound with partial) keeps the model picklable.
    device = layer.weight.device
    if device.type != getattr(layer, "_compute_device", None):
        layer.compute_dtype = config.resolve_compute_dtype(device)
        layer._compute_device = device.type
