"""``QLoRAPlugin``: a Lightning precision plugin that quantizes the base and adds adapters.

Lightning calls ``Precision.convert_module`` inside ``strategy.setup``, after
``configure_model`` and before the optimizer is built (see DESIGN.md), so this is
the one place where the base can be quantized and the adapters injected in time
for ``configure_optimizers`` to see only the adapter parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_qlora.core.adapters import AdapterConfig, AdapterReport, add_adapters, load_adapters
from lightning_qlora.core.budget import BudgetPlan, plan_budget
from lightning_qlora.core.loftq import LoftQInit
from lightning_qlora.core.quant_error import ErrorRecorder, LayerError, summarize
from lightning_qlora.core.quantize import QuantConfig, QuantReport, quantize_model
from lightning_qlora.cpu import CPUFastPath, CPUOptions, options_from_aliases
from lightning_qlora.lightning.checkpoint import AdapterCheckpoint, plain_config
from lightning_qlora.lightning.models import adopt_loaded, cast_frozen, chain, find_models

__all__ = ["SUPPORTED_STRATEGIES", "QLoRAPlugin", "find_models"]

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)
# The keywords QLoRAPlugin took before CPUOptions, and the field each one sets.
_CPU_ALIASES = {
    f"cpu_{field}": field for field in ("mmap_threshold", "release_memory", "reuse_recompute", "fast_dropout")
}
_PRECISION_NAMES = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}


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
        keep_high_precision: A memory allowance, e.g. ``0.05``: keep the layers 4 bits hurt most in
            int8, growing the quantized base by at most that fraction (see ``lightning_qlora.core.budget``).
        calibration: ``input_ids`` to rank layers for ``keep_high_precision`` by output error.
        int8_modules: Layers to quantize to int8 as given (e.g. the plan a saved adapter was trained with).
        cpu: The CPU fast path (:class:`~lightning_qlora.CPUOptions`); it acts only when training on CPU.
            The keywords ``cpu_mmap_threshold``, ``cpu_release_memory``, ``cpu_reuse_recompute`` and
            ``cpu_fast_dropout`` are deprecated aliases of its fields.
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: str | torch.dtype = "auto",
        quant_storage: str | torch.dtype = "uint8",
        skip_modules: Sequence[str] = (),
        adapters: AdapterConfig | None = None,
        keep_high_precision: float | None = None,
        calibration: torch.Tensor | None = None,
        int8_modules: Sequence[str] = (),
        *,
        cpu: CPUOptions | None = None,
        **deprecated: Any,
    ) -> None:
        # MixedPrecision.__init__ is skipped on purpose: the precision depends on the
        # device, which is known only at setup; until then behave like plain fp32.
        self.quant_config = QuantConfig(quant_type, double_quant, compute_dtype, quant_storage, tuple(skip_modules))
        self.adapter_config = adapters or AdapterConfig()
        if keep_high_precision is not None and (
            isinstance(keep_high_precision, bool)
            or not isinstance(keep_high_precision, (int, float))
            or keep_high_precision <= 0
        ):
            raise ValueError(
                f"keep_high_precision={keep_high_precision!r} should be a positive fraction, e.g. 0.05 for +5% memory."
            )
        self.keep_high_precision = keep_high_precision
        self.calibration = calibration
        self.budget_plans: dict[str, BudgetPlan] = {}
        self.int8_modules = tuple(int8_modules)
        self.cpu_options = options_from_aliases(cpu, deprecated, _CPU_ALIASES, type(self).__name__)
        self._cpu_path = CPUFastPath(self.cpu_options)
        self.precision = "32-true"
        self.device = "cpu"
        self.scaler: torch.amp.GradScaler | None = None
        self.compute_dtype: torch.dtype | None = None
        self.peft_models: dict[str, nn.Module] = {}
        self.quant_reports: dict[str, QuantReport] = {}
        self.adapter_reports: dict[str, AdapterReport] = {}
        # Per-layer relative weight error of the quantization (lightning_qlora.core.quant_error.write_error_report).
        self.quant_errors: dict[str, list[LayerError]] = {}
        self._module: nn.Module | None = None
        self._checkpoint = AdapterCheckpoint()
        # A saved PEFT adapter to start from instead of fresh adapters (set by LoRAAdapters(load_from=...)).
        self.adapter_source: str | None = None
        # Errors of layers quantized while loading (low_memory), which convert_module then adopts.
        self._load_recorder: ErrorRecorder | None = None

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
            self._check_strategy(trainer.strategy)
            device = trainer.strategy.root_device
        show = trainer is None or trainer.is_global_zero
        self._module = module
        for name, model in find_models(module).items():
            label = name or type(model).__name__
            self._checkpoint.remember_base(label, model, self.adapter_config.modules_to_save)
            fresh = self.adapter_source is None and not getattr(model, "peft_config", None)
            loftq = LoftQInit(self.adapter_config.r) if fresh and self.adapter_config.init == "loftq" else None
            recorder = ErrorRecorder()
            promoted = self.int8_modules
            if self.keep_high_precision and not getattr(model, "is_loaded_in_4bit", False):
                plan = plan_budget(model, self.quant_config, self.keep_high_precision, self.calibration)
                self.budget_plans[label] = plan
                promoted = plan.promoted
                rank_zero_info(f"QLoRAPlugin: {label}: {plan.summary()}")
            report = quantize_model(
                model,
                self.quant_config,
                device,
                show_progress=show,
                on_layer=chain(recorder, loftq),
                int8_modules=promoted,
            )
            if loftq is not None and not report.quantized:
                raise ValueError(
                    "adapter init='loftq' needs the unquantized weights, but the model came already quantized"
                    " (e.g. low_memory=True); load it unquantized, or use init='default'."
                )
            if not report.quantized and self._load_recorder is not None:
                recorder, self._load_recorder = self._load_recorder, None
                adopt_loaded(report, recorder.errors, model)
            if recorder.errors:
                self.quant_errors[label] = recorder.errors
                rank_zero_info(f"QLoRAPlugin: {label}: {summarize(recorder.errors)}")
            self._set_precision(report.compute_dtype, report.device)
            if report.quantized:
                self.quant_reports[label] = report
                rank_zero_info(f"QLoRAPlugin: {label}: {report.summary()}")
            if getattr(model, "peft_config", None):
                continue  # adapters already there: a second fit/validate/test on the same module
            if self.adapter_source is not None:
                peft_model, adapter_report = load_adapters(
                    model,
                    self.adapter_source,
                    trainable=True,
                    gradient_checkpointing=self.adapter_config.gradient_checkpointing,
                    offload_activations=self.adapter_config.offload_activations,
                )
            else:
                peft_model, adapter_report = add_adapters(model, self.adapter_config)
                if loftq is not None:
                    n = loftq.apply(model)
                    rank_zero_info(f"QLoRAPlugin: {label}: LoftQ-initialized {n} adapters from the quantization error")
            self.peft_models[label] = peft_model
            self.adapter_reports[label] = adapter_report
            rank_zero_info(f"QLoRAPlugin: {label}: {adapter_report.summary()}")
            cast_frozen(model, report.compute_dtype)
        self._cpu_path.after_setup(module, self.device)
        return module

    def _check_strategy(self, strategy: Any) -> None:
        if not isinstance(strategy, SUPPORTED_STRATEGIES) or isinstance(strategy, FSDPStrategy):
            raise ValueError(
                f"QLoRAPlugin does not support {type(strategy).__name__};"
                " use strategy='auto' (one device) or strategy='ddp', or for FSDP:"
                " Trainer(strategy=QLoRAFSDPStrategy(), plugins=[QLoRAFSDPPlugin()]) (trainer=fsdp in the CLI)."
            )

    def needs_unquantized_weights(self) -> bool:
        """Whether setup reads the fp32 weights: the precision budget and LoftQ do, so no low-memory load."""
        fresh = self.adapter_source is None
        return bool(self.keep_high_precision) or (fresh and self.adapter_config.init == "loftq")

    def loading_hook(self) -> Callable[[str, torch.Tensor, nn.Module], None]:
        """An ``on_layer`` hook for quantizing while loading: the plugin reports the layers' errors, and
        fingerprints their weights before they are packed (for the resume check)."""
        self._load_recorder = ErrorRecorder()
        return chain(self._load_recorder, self._checkpoint.loaded)

    def _set_precision(self, compute_dtype: torch.dtype, device: torch.device) -> None:
        self.compute_dtype = compute_dtype
        self.precision = _PRECISION_NAMES[compute_dtype]
        self.device = device.type
        if compute_dtype == torch.float16 and self.scaler is None and device.type == "cuda":
            self.scaler = self._new_scaler()

    def _new_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler for fp16 compute on CUDA."""
        return torch.amp.GradScaler(device="cuda")

    def configs_before_setup(self) -> dict[str, dict[str, Any]]:
        """The quant and adapter configs as a checkpoint records them, as far as known before setup.

        A resume is checked against these before any model loads; keys that only setup
        resolves are left out here and checked against the full record at setup.
        """
        return {"quant": plain_config(self.quant_config), "adapter": plain_config(self.adapter_config)}

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
    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        # RNG states come back right before the first step after a resume, so that LoRA
        # dropout draws the same masks as an uninterrupted run would.
        self._checkpoint.rng.restore()
        with self.forward_context():
            yield

    @override
    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        self._cpu_path.after_step()
        return result

    @override
    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if self.scaler is None:
            # No loss scaling (fp32 on CPU, bf16): the gradients are already unscaled, so a fused
            # optimizer clips like any other. MixedPrecision refuses fused ones unconditionally.
            Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
            return
        super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: base, quantization and adapter per model."""
        quant, adapter = plain_config(self.quant_config), plain_config(self.adapter_config)
        quant["int8_modules"] = sorted(self.promoted())
        return self._checkpoint.meta(self.peft_models, quant, adapter)

    def promoted(self, label: str | None = None) -> tuple[str, ...]:
        """Layers quantized to int8 by the precision budget (or as given), for ``label`` or any model."""
        plans = [p for k, p in self.budget_plans.items() if label is None or k == label]
        return tuple(n for p in plans for n in p.promoted) or self.int8_modules

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> str:
        """Raise unless ``checkpoint`` is ours and matches this run's base, quantization and adapter; its path."""
        return self._checkpoint.check(checkpoint, self.checkpoint_meta(), self._module)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors in the checkpoint, and record what they belong to."""
        if self._module is not None and self.peft_models:
            self._checkpoint.save(checkpoint, self._module, self.checkpoint_meta())

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint against this run and load its adapter weights.

        Lightning calls this after ``convert_module``, when the adapters exist; its own
        earlier, non-strict ``load_state_dict`` could not place them yet.
        """
        if self._module is not None:
            self._checkpoint.load(checkpoint, self._module, self.checkpoint_meta())

    @override
    def state_dict(self) -> dict[str, Any]:
        # Lightning asks every rank (then rank 0 writes), so each rank's RNG can be kept.
        return self._checkpoint.state_dict(self.scaler)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint.load_state_dict(state_dict, self.scaler)
