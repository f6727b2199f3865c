"""``QLoRAPlugin``: a Lightning precision plugin that quantizes the base and adds adapters.

Lightning calls ``Precision.convert_module`` inside ``strategy.setup``, after
``configure_model`` and before the optimizer is built (see DESIGN.md), so this is
the one place where the base can be quantized and the adapters injected in time
for ``configure_optimizers`` to see only the adapter parameters.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Generator, Sequence
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
from lightning_qlora.core.quantize import QuantConfig, QuantReport, quantize_model, quantized_nbytes
from lightning_qlora.cpu.allocator import CreepGuard, copy_file_backed, pin_mmap_threshold, release_free_memory
from lightning_qlora.cpu.recompute import reuse_recomputation
from lightning_qlora.lightning.checkpoint import (
    FORMAT_VERSION,
    META_KEY,
    base_fingerprint,
    check_meta,
    load_trainable_state,
    plain_config,
    trainable_state,
)
from lightning_qlora.lightning.rng import gather_rng_states, rng_states_of_this_rank, set_rng_states

log = logging.getLogger(__name__)
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
        keep_high_precision: A memory allowance, e.g. ``0.05``: keep the layers 4 bits hurt most in
            int8, growing the quantized base by at most that fraction (see ``lightning_qlora.core.budget``).
        calibration: ``input_ids`` to rank layers for ``keep_high_precision`` by output error.
        int8_modules: Layers to quantize to int8 as given (e.g. the plan a saved adapter was trained with).
        cpu_mmap_threshold: On CPU, pin glibc's mmap threshold to this many bytes (e.g. ``65536``):
            a lower peak RSS at large batches for slower steps (see ``lightning_qlora.cpu.allocator``).
        cpu_release_memory: On CPU, hand freed heap pages back to the OS (``malloc_trim``) after
            setup, and after an optimizer step when RSS has crept 25% above its lowest point after
            a step, so that it does not creep.
        cpu_reuse_recompute: On CPU with gradient checkpointing, let the backward use the dense
            weights dequantized in the recompute, and replay the forward's LoRA dropout masks there,
            instead of computing both again; dequantize the block scales once; add the LoRA term
            without PEFT's defensive copy of the base output: the same results bit for bit, in
            fewer operations (``lightning_qlora.cpu.recompute``). ``False`` runs stock bitsandbytes
            and PEFT layers.
        cpu_fast_dropout: With ``cpu_reuse_recompute``, draw the LoRA dropout masks on CPU from
            8 random bits per element instead of torch's 64 (``lightning_qlora.cpu.dropout``): exactly
            the same Bernoulli distribution, from another random stream, so results are not
            bit-equal to PEFT's. ``False`` draws torch's masks.
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
        cpu_mmap_threshold: int | None = None,
        cpu_release_memory: bool = True,
        cpu_reuse_recompute: bool = True,
        cpu_fast_dropout: bool = True,
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
        if cpu_mmap_threshold is not None and (isinstance(cpu_mmap_threshold, bool) or cpu_mmap_threshold <= 0):
            raise ValueError(
                f"cpu_mmap_threshold={cpu_mmap_threshold!r} should be a positive number of bytes (e.g. 65536) or None."
            )
        self.cpu_mmap_threshold = cpu_mmap_threshold
        self.cpu_release_memory = cpu_release_memory
        self._creep_guard = CreepGuard()
        self.cpu_reuse_recompute = cpu_reuse_recompute
        self.cpu_fast_dropout = cpu_fast_dropout
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
        self._fingerprints: dict[str, dict[str, Any]] = {}
        self._pending_rng: dict[str, Any] | None = None
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
            if label not in self._fingerprints:
                self._fingerprints[label] = base_fingerprint(model)
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
                on_layer=_chain(recorder, loftq),
                int8_modules=promoted,
            )
            if loftq is not None and not report.quantized:
                raise ValueError(
                    "adapter init='loftq' needs the unquantized weights, but the model came already quantized"
                    " (e.g. low_memory=True); load it unquantized, or use init='default'."
                )
            if not report.quantized and self._load_recorder is not None:
                recorder, self._load_recorder = self._load_recorder, None
                _adopt_loaded(report, recorder.errors, model)
            if recorder.errors:
                self.quant_errors[label] = recorder.errors
                rank_zero_info(f"QLoRAPlugin: {label}: {summarize(recorder.errors)}")
            self._set_precision(report.compute_dtype, report.device)
            if report.quantized:
                self.quant_reports[label] = report
                rank_zero_info(f"QLoRAPlugin: {label}: {report.summary()}")
            if getattr(model, "peft_config", None):
                self._reuse_recompute(model)
                continue  # adapters already there: a second fit/validate/test on the same module
            if self.adapter_source is not None:
                peft_model, adapter_report = load_adapters(
                    model,
                    self.adapter_source,
                    trainable=True,
                    gradient_checkpointing=self.adapter_config.gradient_checkpointing,
                )
            else:
                peft_model, adapter_report = add_adapters(model, self.adapter_config)
                if loftq is not None:
                    n = loftq.apply(model)
                    rank_zero_info(f"QLoRAPlugin: {label}: LoftQ-initialized {n} adapters from the quantization error")
            self.peft_models[label] = peft_model
            self.adapter_reports[label] = adapter_report
            rank_zero_info(f"QLoRAPlugin: {label}: {adapter_report.summary()}")
            self._cast_frozen(model, report.compute_dtype)
            self._reuse_recompute(model)
        if self.device == "cpu" and self.cpu_release_memory:
            # The embedding's view of the mapped checkpoint would keep every page read resident.
            copied = copy_file_backed(module)
            if copied:
                log.debug("QLoRAPlugin: copied %d bytes of file-backed weights to let the mapping go", copied)
            # Loading and quantizing leave the fp32 weights' freed pages on the heap.
            gc.collect()
            release_free_memory()
        return module

    def _reuse_recompute(self, model: nn.Module) -> None:
        if self.device == "cpu" and self.cpu_reuse_recompute:
            layers, dropouts = reuse_recomputation(model, fast_dropout=self.cpu_fast_dropout)
            if layers or dropouts:
                log.debug("QLoRAPlugin: %d 4-bit layers and %d dropouts reuse the recompute", layers, dropouts)

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

    def loading_hook(self) -> ErrorRecorder:
        """An ``on_layer`` hook for quantizing while loading, whose errors the plugin then reports."""
        self._load_recorder = ErrorRecorder()
        return self._load_recorder

    def _set_precision(self, compute_dtype: torch.dtype, device: torch.device) -> None:
        self.compute_dtype = compute_dtype
        self.precision = _PRECISION_NAMES[compute_dtype]
        self.device = device.type
        if device.type == "cpu" and self.cpu_mmap_threshold and pin_mmap_threshold(self.cpu_mmap_threshold):
            log.debug("QLoRAPlugin: glibc mmap threshold pinned to %d bytes", self.cpu_mmap_threshold)
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

    @staticmethod
    def _cast_frozen(model: nn.Module, dtype: torch.dtype, keep_norms: bool = True, from_any: bool = False) -> None:
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
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None
        with self.forward_context():
            yield

    @override
    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if self.device == "cpu" and self.cpu_release_memory:
            # Only when RSS crept up: trimming every step re-faults the next step's activations.
            self._creep_guard.after_step()
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
        models = {
            label: {"base": self._fingerprints[label], "quant": quant, "adapter": adapter} for label in self.peft_models
        }
        return {"format": FORMAT_VERSION, "models": models}

    def promoted(self, label: str | None = None) -> tuple[str, ...]:
        """Layers quantized to int8 by the precision budget (or as given), for ``label`` or any model."""
        plans = [p for k, p in self.budget_plans.items() if label is None or k == label]
        return tuple(n for p in plans for n in p.promoted) or self.int8_modules

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors in the checkpoint, and record what they belong to."""
        if self._module is None or not self.peft_models or META_KEY in checkpoint:
            return
        checkpoint["state_dict"] = trainable_state(self._module)
        checkpoint[META_KEY] = self.checkpoint_meta()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint against this run and load its adapter weights.

        Lightning calls this after ``convert_module``, when the adapters exist; its own
        earlier, non-strict ``load_state_dict`` could not place them yet.
        """
        if self._module is None:
            return
        path = self.check_checkpoint(checkpoint)
        load_trainable_state(self._module, checkpoint["state_dict"], path)

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> str:
        """Raise unless ``checkpoint`` is ours and matches this run's base, quantization and adapter; its path."""
        path = str(getattr(self._module.trainer, "ckpt_path", None) or "checkpoint")
        if META_KEY not in checkpoint:
            raise ValueError(
                f"{path} is not an adapter-only lightning-qlora checkpoint (no {META_KEY!r} entry);"
                " resume from a checkpoint written by a QLoRAPlugin run."
            )
        check_meta(checkpoint[META_KEY], self.checkpoint_meta(), path)
        return path

    @override
    def state_dict(self) -> dict[str, Any]:
        # Lightning asks every rank (then rank 0 writes), so each rank's RNG can be kept.
        ranks = gather_rng_states()
        state: dict[str, Any] = {"rng": ranks[0], "rng_ranks": ranks}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])
        self._pending_rng = rng_states_of_this_rank(state_dict)


def _adopt_loaded(report: QuantReport, errors: list[LayerError], model: nn.Module) -> None:
    """Fill ``report`` with the layers quantized while loading (``low_memory``), as if quantized here."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    errors.sort(key=lambda e: order.get(e.name, len(order)))  # file order -> model order
    for error in errors:
        report.quantized.append(error.name)
        report.bytes_before += error.numel * 4  # lowmem reads every weight as fp32
        report.bytes_after += quantized_nbytes(model.get_submodule(error.name))
    report.already_quantized = [n for n in report.already_quantized if n not in set(report.quantized)]


def _chain(*hooks):
    """One ``on_layer`` hook calling each given (non-None) hook in turn."""
    live = [h for h in hooks if h is not None]

    def call(name: str, weight: torch.Tensor, layer: nn.Module) -> None:
        for hook in live:
            hook(name, weight, layer)

    return call
