"""``QLoRAPlugin``: a Lightning precision plugin that quantizes the base and adds adapters.

Lightning calls ``Precision.convert_module`` inside ``strategy.setup``, after
``configure_model`` and before the optimizer is built (see DESIGN.md), so this is
the one place where the base can be quantized and the adapters injected in time
for ``configure_optimizers`` to see only the adapter parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_qlora.adapters import AdapterConfig, AdapterReport, add_adapters
from lightning_qlora.quantize import QuantConfig, QuantReport, quantize_model

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)
_PRECISION_NAMES = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}


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


class QLoRAPlugin(MixedPrecision):
    """Quantize the frozen base to 4 bits (or 8) and train LoRA adapters on it.

    ``Trainer(plugins=[QLoRAPlugin()])`` alone gives QLoRA as in Dettmers et al. (2023):
    NF4 with double quantization, LoRA on every Linear layer but the heads. Add a
    :class:`~lightning_qlora.LoRAAdapters` callback to choose the adapters.

    The plugin also sets the Trainer's precision: 16-bit autocast on GPUs (bf16 where
    supported), plain fp32 on CPU. Do not pass ``Trainer(precision=...)`` with it.

    Args:
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        double_quant: Quantize the block scales too (4-bit types only).
        compute_dtype: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        quant_storage: Storage dtype of packed 4-bit weights (``"uint8"``; ``"bf16"`` for FSDP).
        skip_modules: Extra module names to keep unquantized (heads are always kept).
        adapters: The default adapter spec, used when no ``LoRAAdapters`` callback gives one.
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: str | torch.dtype = "auto",
        quant_storage: str | torch.dtype = "uint8",
        skip_modules: Sequence[str] = (),
        adapters: AdapterConfig | None = None,
    ) -> None:
        # MixedPrecision.__init__ is skipped on purpose: the precision depends on the
        # device, which is known only at setup; until then behave like plain fp32.
        self.quant_config = QuantConfig(quant_type, double_quant, compute_dtype, quant_storage, tuple(skip_modules))
        self.adapter_config = adapters or AdapterConfig()
        self.precision = "32-true"
        self.device = "cpu"
        self.scaler: torch.amp.GradScaler | None = None
        self.compute_dtype: torch.dtype | None = None
        self.peft_models: dict[str, nn.Module] = {}
        self.quant_reports: dict[str, QuantReport] = {}
        self.adapter_reports: dict[str, AdapterReport] = {}

    def __repr__(self) -> str:
        # Lightning quotes the plugin's repr when Trainer gets both precision= and a
        # precision plugin, so the fix is spelled out here.
        q = self.quant_config
        return (
            f"QLoRAPlugin(quant_type={q.quant_type!r}, compute_dtype={self._dtype_name(q.compute_dtype)!r})"
            " [QLoRAPlugin sets the precision itself: remove `precision=` from Trainer and pass"
            " QLoRAPlugin(compute_dtype=...) instead]"
        )

    @staticmethod
    def _dtype_name(dtype: str | torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize every transformers model in ``module`` and inject adapters, in place."""
        trainer = getattr(module, "_trainer", None)
        device = None
        if trainer is not None:
            strategy = trainer.strategy
            if not isinstance(strategy, SUPPORTED_STRATEGIES):
                raise ValueError(
                    f"QLoRAPlugin does not support {type(strategy).__name__} yet;"
                    " use strategy='auto' (one device) or strategy='ddp'."
                )
            device = strategy.root_device
        show = trainer is None or trainer.is_global_zero
        for name, model in find_models(module).items():
            label = name or type(model).__name__
            report = quantize_model(model, self.quant_config, device, show_progress=show)
            self._set_precision(report.compute_dtype, report.device)
            if report.quantized:
                self.quant_reports[label] = report
                rank_zero_info(f"QLoRAPlugin: {label}: {report.summary()}")
            if getattr(model, "peft_config", None):
                continue  # adapters already there: a second fit/validate/test on the same module
            peft_model, adapter_report = add_adapters(model, self.adapter_config)
            self.peft_models[label] = peft_model
            self.adapter_reports[label] = adapter_report
            rank_zero_info(f"QLoRAPlugin: {label}: {adapter_report.summary()}")
            self._cast_frozen(model, report.compute_dtype)
        return module

    def _set_precision(self, compute_dtype: torch.dtype, device: torch.device) -> None:
        self.compute_dtype = compute_dtype
        self.precision = _PRECISION_NAMES[compute_dtype]
        self.device = device.type
        if compute_dtype == torch.float16 and self.scaler is None and device.type == "cuda":
            self.scaler = torch.amp.GradScaler(device="cuda")

    @staticmethod
    def _cast_frozen(model: nn.Module, compute_dtype: torch.dtype) -> None:
        """Keep frozen float weights (embeddings, heads) in the 16-bit compute dtype.

        Norms stay fp32 and trainable weights keep fp32 master copies; on CPU the
        compute dtype is fp32 and nothing changes.
        """
        if compute_dtype == torch.float32:
            return
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                continue
            for param in module.parameters(recurse=False):
                if not param.requires_grad and param.dtype == torch.float32 and type(param) is nn.Parameter:
                    param.data = param.data.to(compute_dtype)

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast to the 16-bit compute dtype on GPU; nothing in fp32."""
        if self.compute_dtype in (None, torch.float32):
            yield
            return
        with torch.autocast(self.device, dtype=self.compute_dtype, cache_enabled=False):
            yield

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}
