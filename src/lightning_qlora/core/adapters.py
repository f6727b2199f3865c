"""Inject trainable LoRA adapters through PEFT, so that exports are standard PEFT.

Works on any ``nn.Module`` (quantized or not), with or without Lightning.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lightning_qlora.core.checks import Check, Checked, Combo, is_bool, is_int, is_number, one_of
from lightning_qlora.core.quantize import head_names

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ALL_LINEAR = "all-linear"
INITS = ("default", "loftq")


def _names_something(targets: Any) -> bool:
    """A non-empty string, or a non-empty collection of names."""
    if isinstance(targets, str):
        return bool(targets)
    return isinstance(targets, Collection) and len(targets) > 0


@dataclass(frozen=True)
class AdapterConfig(Checked):
    """Which LoRA adapters to add, with the loralib names PEFT uses.

    Args:
        r: Rank of the update ``B @ A``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input, in ``[0, 1)``.
        target_modules: ``"all-linear"`` (every Linear but the heads, as in the QLoRA paper),
            a list of module names (matched as name suffixes), or a regex matched against full names.
        modules_to_save: Modules trained fully and saved with the adapter, e.g. ``["score"]``
            for a classification head.
        gradient_checkpointing: Recompute activations in backward to save memory: ``True`` (every
            decoder layer), ``False``, or ``k``: every k-th layer (0, k, 2k, ...), the others keep
            their activations (selective checkpointing, as torchtune's ``ac_option``).
        use_dora: DoRA (Liu et al. 2024): learn a per-output magnitude on top of the LoRA direction.
        use_rslora: rank-stabilized LoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``"default"`` (B = 0: the model starts as the quantized base) or ``"loftq"`` (the
            adapters start at the rank-r SVD of the quantization error; 4-bit types only).
        offload_activations: Hold what checkpointing keeps (each checkpointed layer's input) in
            host memory during the forward (transformers' ``offload``). Saves accelerator memory;
            on a CPU the activations are already in host memory and it only adds a copy.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)
    gradient_checkpointing: bool | int = True
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "default"
    offload_activations: bool = False

    # The rules, here only: the constructor raises on them, and the run config check
    # (app/config.py) reports them under the adapter.* keys.
    CHECKS = (
        Check("r", is_int(1), "a positive integer", "16"),
        Check("alpha", is_number(0, strict=True), "a positive number", "2*r"),
        Check("dropout", is_number(0, high=1), "in [0, 1)", "0.05"),
        Check(
            "target_modules",
            _names_something,
            f"{ALL_LINEAR!r}, a list of layer names or a regex",
            python=f"{{name}} is empty; use {ALL_LINEAR!r} or a list such as ['q_proj', 'v_proj'].",
        ),
        Check(
            "gradient_checkpointing",
            lambda v: is_bool(v) or is_int(1)(v),
            "true, false or k (every k-th layer, an integer >= 1)",
        ),
        Check("use_dora", is_bool, "true or false"),
        Check("use_rslora", is_bool, "true or false"),
        one_of("init", INITS),
        Check("offload_activations", is_bool, "true or false"),
        Combo(
            ("offload_activations", "gradient_checkpointing"),
            lambda offload, gc: not (offload is True and gc is False),
            config="{offload_activations}=true needs {gradient_checkpointing} (it offloads what checkpointing keeps)",
            python="{offload_activations}=True needs {gradient_checkpointing}; it offloads what checkpointing keeps.",
        ),
        Combo(
            ("init", "use_dora"),
            lambda init, dora: not (init == "loftq" and dora),
            config="{init}=loftq and {use_dora}=true cannot be combined; choose one",
            python="{init}='loftq' with {use_dora}=True is not supported; choose one of them.",
        ),
    )

    def __post_init__(self) -> None:
        self.check()
        # Checked: now only normalize to tuples (a string target stays: all-linear or a regex).
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        saves = self.modules_to_save
        object.__setattr__(self, "modules_to_save", (saves,) if isinstance(saves, str) else tuple(saves or ()))


@dataclass
class AdapterReport:
    """What :func:`add_adapters` did."""

    layers: list[str]
    trainable: int
    total: int
    r: int
    alpha: float

    def summary(self) -> str:
        """One line for the log."""
        pct = 100 * self.trainable / self.total if self.total else 0.0
        return (
            f"LoRA r={self.r} alpha={self.alpha:g} on {len(self.layers)} layers:"
            f" {self.trainable:,} trainable of {self.total:,} parameters ({pct:.2f}%)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Trainable and total parameter counts, counting 4-bit packed weights by their logical size."""
    trainable = total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        n = state.shape.numel() if state is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def resolve_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the Linear layers that ``config.target_modules`` selects, heads excluded.

    Raises:
        ValueError: the selection, or one entry of a list, matches no Linear layer.
    """
    for entry in config.modules_to_save:
        if not any(n == entry or n.endswith("." + entry) for n, _ in model.named_modules()):
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module of {type(model).__name__};"
                " name the head to train fully, e.g. 'score' or 'classifier'."
            )
    # Heads stay out of LoRA, and so do modules that train fully.
    saved = {
        n for n, _ in model.named_modules() if n and any(n == s or n.endswith("." + s) for s in config.modules_to_save)
    }
    blocked = head_names(model) | saved
    linears = [n for n in _linear_names(model) if not any(n == b or n.startswith(b + ".") for b in blocked)]
    available = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears})) or "none"
    spec = config.target_modules
    if spec == ALL_LINEAR:
        chosen = linears
    elif isinstance(spec, str):
        chosen = [n for n in linears if re.fullmatch(spec, n)]
    else:
        chosen = []
        for entry in spec:
            hits = [n for n in linears if n == entry or n.endswith("." + entry)]
            if not hits:
                raise ValueError(
                    f"target_modules entry {entry!r} matches no Linear layer of {type(model).__name__};"
                    f" available: {available}."
                )
            chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise ValueError(
            f"target_modules={spec!r} matches no Linear layer of {type(model).__name__}; available: {available}."
        )
    return chosen


def checkpoint_every(gradient_checkpointing: bool | int) -> int:
    """``gradient_checkpointing`` as a stride: 0 (off), 1 (every layer) or k (every k-th layer)."""
    if isinstance(gradient_checkpointing, bool):
        return int(gradient_checkpointing)
    return gradient_checkpointing


def _select_checkpointed_layers(model: nn.Module, every: int) -> None:
    """Keep checkpointing on decoder layers 0, k, 2k, ... only; the others keep their activations."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0


def _offload_checkpoint_inputs(model: nn.Module) -> None:
    """Run each checkpointed layer under ``save_on_cpu``: what the checkpoint keeps waits in host memory.

    Pinned where an accelerator exists; on a CPU the hooks hand the tensors back as they are.
    """
    import torch
    from torch.autograd.graph import save_on_cpu

    if all(p.device.type == "cpu" for p in model.parameters()):
        log.warning("offload_activations on a CPU model: the activations are already in host memory; it saves nothing.")
    accelerator = getattr(torch, "accelerator", None)
    device = accelerator.current_accelerator() if accelerator is not None else None
    device_type = device.type if device is not None else "cuda"
    pin = device is not None or torch.cuda.is_available()

    def wrap(func: Any) -> Any:
        def offloaded(*args: Any, **kwargs: Any) -> Any:
            with save_on_cpu(pin_memory=pin, device_type=device_type):
                return func(*args, **kwargs)

        return offloaded

    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = wrap(func)


def _prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool | int, offload: bool = False) -> None:
    """Freeze the base, keep norms in fp32, and make checkpointing work with a frozen base."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        # Norm statistics in 16-bit lose precision that the adapters cannot win back.
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.float()
    if not gradient_checkpointing:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning(
            "%s does not support gradient checkpointing; training without it (set gradient_checkpointing=False"
            " to silence this).",
            type(model).__name__,
        )
        return
    # Non-reentrant checkpointing handles frozen inputs and kwargs; transformers 5 renamed the
    # method and learned a stride and offloading, so use what this version has.
    kwargs = {"use_reentrant": False}
    every = checkpoint_every(gradient_checkpointing)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    else:
        (enable or model.gradient_checkpointing_enable)(kwargs)
        if every > 1:
            _select_checkpointed_layers(model, every)
    if offload:
        _offload_checkpoint_inputs(model)
    # With every base weight frozen, nothing upstream requires grad; without this the
    # checkpointed blocks get inputs that don't require grad (peft #742).
    model.enable_input_require_grads()


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    kinds = (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
    )
    for suffix, task in kinds:
        if name.endswith(suffix):
            return task
    return None


def add_adapters(model: nn.Module, config: AdapterConfig | None = None):
    """Freeze ``model`` and inject LoRA adapters into it, in place.

    The layers of ``model`` itself are replaced, so code that holds ``model`` trains the
    adapters; the returned ``PeftModel`` wraps the same modules and saves them in PEFT format.

    Args:
        model: The (usually quantized) model.
        config: The adapter spec; defaults to ``AdapterConfig()``.

    Returns:
        ``(peft_model, report)``.
    """
    from peft import LoraConfig, get_peft_model

    config = config or AdapterConfig()
    if getattr(model, "peft_config", None):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; add them once, or load a new base model.")
    chosen = resolve_targets(model, config)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    # Suffix matching on leaf names keeps adapter_config.json short; list the few
    # same-named layers that were not chosen (e.g. under skip_modules) as exclusions.
    excluded = [n for n in _linear_names(model) if n not in chosen and n.rsplit(".", 1)[-1] in leaves]
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=leaves,
        exclude_modules=excluded or None,
        modules_to_save=list(config.modules_to_save) or None,
        task_type=_task_type(model),
        bias="none",
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
    )
    _prepare_for_kbit_training(model, config.gradient_checkpointing, config.offload_activations)
    with warnings.catch_warnings():
        # PEFT still asks transformers 5 the deprecated `is_gradient_checkpointing`.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    trainable, total = count_parameters(model)
    return peft_model, AdapterReport(chosen, trainable, total, config.r, config.alpha)


def check_adapter_dir(directory: str | os.PathLike) -> Path:
    """Raise ``FileNotFoundError`` naming what an adapter directory lacks."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist; pass the run's adapter/ folder.")
    missing = [f for f in ADAPTER_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"adapter directory {directory} lacks {', '.join(missing)}; export it again (LoRAAdapters(export_dir=...))"
            " or point at a complete PEFT adapter."
        )
    return directory


def load_adapters(
    model: nn.Module,
    directory: str,
    trainable: bool = False,
    gradient_checkpointing: bool | int = False,
    offload_activations: bool = False,
):
    """Inject a saved PEFT adapter into ``model`` in place (like :func:`add_adapters`, with its weights).

    Args:
        model: The base model, quantized the way the adapter was trained (or not, to compare).
        directory: A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        trainable: Keep training the loaded adapter.
        gradient_checkpointing: Recompute activations in backward (when training on).
        offload_activations: Hold checkpointed layers' inputs in host memory (when training on),
            as ``AdapterConfig.offload_activations``.

    Returns:
        ``(peft_model, report)``.
    """
    from peft import PeftConfig, PeftModel

    check_adapter_dir(directory)
    if getattr(model, "peft_config", None):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; load the adapter into a fresh base.")
    peft_config = PeftConfig.from_pretrained(directory)
    if trainable:
        AdapterConfig(gradient_checkpointing=gradient_checkpointing, offload_activations=offload_activations)
        _prepare_for_kbit_training(model, gradient_checkpointing, offload_activations)
    else:
        _prepare_for_kbit_training(model, False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, directory, is_trainable=trainable)
    layers = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    trainable_n, total = count_parameters(model)
    return peft_model, AdapterReport(layers, trainable_n, total, peft_config.r, peft_config.lora_alpha)
