"""Replace a model's ``nn.Linear`` layers with bitsandbytes 4-bit or 8-bit layers.

Works on any ``nn.Module``, with or without Lightning. The output head and
classification heads stay in high precision by default: they are small next to
the body and quantizing them costs the most quality (QLoRA paper, section 4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_qlora.core.bnb import quantized_linear_types, require_bitsandbytes
from lightning_qlora.core.checks import Check, Checked, Combo, is_bool, one_of
from lightning_qlora.core.quantize4bit import quantize_layer

QUANT_TYPES = ("nf4", "fp4", "int8")
# Leaf names of heads that stay unquantized: causal-LM head, sequence-classification
# heads of transformers models, extractive-QA head.
DEFAULT_SKIP = ("lm_head", "score", "classifier", "qa_outputs")

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "16": torch.float16,
    "uint8": torch.uint8,
}
_STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def parse_dtype(value: str | torch.dtype, what: str, allowed: Iterable[torch.dtype]) -> torch.dtype:
    """Turn ``"bf16"``, ``"float32"``, ``torch.float16``… into a ``torch.dtype``, checking it is allowed."""
    allowed = tuple(allowed)
    dtype = value if isinstance(value, torch.dtype) else _DTYPE_NAMES.get(str(value).lower())
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{what}={value!r} is not supported; use one of: {names}.")
    return dtype


def _dtype(value: Any) -> torch.dtype | None:
    """``value`` as a dtype (a name such as ``"bf16"``, or a dtype), or None if it names none."""
    return value if isinstance(value, torch.dtype) else _DTYPE_NAMES.get(str(value).lower())


def _is_int8(value: Any) -> bool:
    return str(value).lower() == "int8"


@dataclass(frozen=True)
class QuantConfig(Checked):
    """How to quantize the frozen base weights.

    Args:
        quant_type: ``"nf4"`` (QLoRA's NormalFloat4), ``"fp4"`` or ``"int8"`` (LLM.int8()).
        double_quant: Quantize the 4-bit block scales too (saves ~0.37 bits per parameter).
        compute_dtype: ``"auto"`` (bf16 on GPUs with bf16 units, i.e. compute capability 8.0 on;
            fp16 on older GPUs; fp32 on CPU), or a dtype.
        quant_storage: Dtype the packed 4-bit data is stored as. ``uint8`` is the default;
            FSDP can only shard float storage, so it needs ``bf16``.
        skip_modules: Extra module names (or name prefixes) to keep unquantized, on top
            of the output and classification heads.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | torch.dtype = "auto"
    quant_storage: str | torch.dtype = "uint8"
    skip_modules: tuple[str, ...] = field(default_factory=tuple)

    # The rules, here only: the constructor raises on them, and the run config check
    # (app/config.py) reports them under the quant.* keys.
    CHECKS = (
        one_of("quant_type", QUANT_TYPES, accepts=lambda v: str(v).lower() in QUANT_TYPES),
        Check("double_quant", is_bool, "true or false"),
        one_of(
            "compute_dtype",
            ("auto", "bf16", "fp16", "fp32"),
            accepts=lambda v: v == "auto" or _dtype(v) in _COMPUTE_DTYPES,
            verb="is not supported",
        ),
        one_of(
            "quant_storage",
            ("uint8", "bf16", "fp16", "fp32"),
            accepts=lambda v: _dtype(v) in _STORAGE_DTYPES,
            verb="is not supported",
        ),
        Combo(
            ("quant_type", "compute_dtype"),
            lambda t, c: not (_is_int8(t) and _dtype(c) == torch.bfloat16),
            config="{quant_type}=int8 cannot compute in bf16; use {compute_dtype}=fp16, fp32 or auto",
            python="{quant_type}='int8' does not support {compute_dtype}=bf16 (LLM.int8 matmuls run in fp16);"
            " use {compute_dtype}='fp16', 'fp32' or 'auto'.",
        ),
        Combo(
            ("quant_type", "quant_storage"),
            lambda t, s: not _is_int8(t) or _dtype(s) == torch.uint8,
            config="{quant_storage} applies to 4-bit types only; keep uint8 with int8",
            python="{quant_storage} only applies to 4-bit types; use {quant_storage}='uint8' with int8.",
        ),
    )

    def __post_init__(self) -> None:
        self.check()
        # Checked: now only normalize (lower-case type, dtypes, tuples).
        object.__setattr__(self, "quant_type", str(self.quant_type).lower())
        if self.compute_dtype != "auto":
            object.__setattr__(self, "compute_dtype", _dtype(self.compute_dtype))
        object.__setattr__(self, "quant_storage", _dtype(self.quant_storage))
        skips = self.skip_modules
        object.__setattr__(self, "skip_modules", (skips,) if isinstance(skips, str) else tuple(skips))

    def resolve_compute_dtype(self, device: torch.device | str) -> torch.dtype:
        """The compute dtype for ``device``: the explicit one, or what ``"auto"`` means there."""
        if isinstance(self.compute_dtype, torch.dtype):
            return self.compute_dtype
        device = torch.device(device)
        if device.type != "cuda":
            # CPUs without bf16 units run bf16 matmuls many times slower than fp32.
            return torch.float32
        if self.quant_type == "int8":
            return torch.float16
        return torch.bfloat16 if has_native_bf16(device) else torch.float16


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether a CUDA device computes bf16 in hardware (compute capability 8.0 on, or ROCm).

    ``torch.cuda.is_bf16_supported()`` also says yes for GPUs that only emulate bf16 (V100, T4),
    where it is several times slower than fp16 with a grad scaler.
    """
    if torch.version.hip:
        return True
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return major >= 8


@dataclass
class QuantReport:
    """What :func:`quantize_model` did."""

    quant_type: str
    compute_dtype: torch.dtype
    device: torch.device
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    already_quantized: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        """Bytes after over bytes before, for the layers quantized in this call."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def summary(self) -> str:
        """One line for the log."""
        mib = 2**20
        line = (
            f"quantized {len(self.quantized)} Linear layers to {self.quant_type} on {self.device.type}"
            f" (compute {str(self.compute_dtype).removeprefix('torch.')}):"
            f" weights {self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB ({self.ratio:.3f}x)"
        )
        if self.skipped:
            line += f"; kept {len(self.skipped)} in high precision ({', '.join(self.skipped[:3])}"
            line += ", ...)" if len(self.skipped) > 3 else ")"
        if self.already_quantized:
            line += f"; {len(self.already_quantized)} were already quantized"
        return line


def head_names(model: nn.Module, extra: Iterable[str] = ()) -> set[str]:
    """Full names of the modules to keep out of quantization and out of LoRA targets."""
    skip = set(DEFAULT_SKIP) | set(extra)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if module is out_emb or leaf in skip or any(name == s or name.startswith(s + ".") for s in skip):
            names.add(name)
    return names


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select_linears(model: nn.Module, config: QuantConfig) -> tuple[list[tuple[str, nn.Linear]], list[str], list[str]]:
    """The Linear layers :func:`quantize_model` would quantize, those kept (heads, skips), and those already done."""
    done_types = quantized_linear_types()
    skip = head_names(model, config.skip_modules)
    names = [n for n, _ in model.named_modules() if n]
    for entry in config.skip_modules:
        if not any(n == entry or n.startswith(entry + ".") or n.rsplit(".", 1)[-1] == entry for n in names):
            raise ValueError(
                f"skip_modules entry {entry!r} matches no module of {type(model).__name__};"
                " give a module name (e.g. 'lm_head') or a prefix (e.g. 'model.layers.0')."
            )
    targets: list[tuple[str, nn.Linear]] = []
    skipped, already = [], []
    # LoRA's own A/B matrices are nn.Linear too: never quantize inside an adapter layer.
    tuner_layers = {n for n, m in model.named_modules() if n and _is_tuner_layer(m)}
    for name, module in model.named_modules():
        if _under(name, tuner_layers) and name not in tuner_layers:
            if isinstance(module, done_types) and name.endswith(".base_layer"):
                already.append(name)
            continue
        if isinstance(module, done_types):
            already.append(name)
        elif isinstance(module, nn.Linear) and _under(name, skip):
            skipped.append(name)
        elif isinstance(module, nn.Linear):
            targets.append((name, module))
    return targets, skipped, already


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    on_layer: Callable[[str, torch.Tensor, nn.Module], None] | None = None,
    int8_modules: Iterable[str] = (),
) -> QuantReport:
    """Replace ``model``'s Linear layers, in place, with bitsandbytes quantized layers.

    Layers that are already bitsandbytes layers are left alone, so calling this twice
    is safe (re-quantizing packed uint8 weights would fail or corrupt them).

    Args:
        model: Any module; typically a transformers ``PreTrainedModel``.
        config: Quantization settings; defaults to NF4 with double quantization.
        device: Where to quantize and keep the weights; defaults to where they are.
        show_progress: Show a progress bar over the layers.
        on_layer: Called as ``on_layer(name, original_weight, quantized_layer)`` for each layer,
            while the original weight still exists (LoftQ initialization uses it).
        int8_modules: Full names of layers to quantize to LLM.int8 instead (a precision budget).

    Returns:
        A :class:`QuantReport` with the layer counts and weight bytes before and after.

    Raises:
        TypeError: the model has no ``nn.Linear`` layer to quantize.
        ValueError: a weight is on the meta device or is not a float tensor.
    """
    config = config or QuantConfig()
    bnb = require_bitsandbytes()
    targets, report_skipped, already = select_linears(model, config)
    if not targets and not already:
        heads = sorted(head_names(model, config.skip_modules)) or "none"
        raise TypeError(
            f"{type(model).__name__} has no nn.Linear layer to quantize (kept as heads: {heads})."
            " QLoRA replaces nn.Linear layers only; models built from other layer types (e.g. transformers'"
            " Conv1D in GPT-2) need a model whose projections are nn.Linear."
        )

    first = targets[0][1].weight if targets else None
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    compute_dtype = config.resolve_compute_dtype(device)
    report = QuantReport(config.quant_type, compute_dtype, device, skipped=report_skipped, already_quantized=already)

    promoted = set(int8_modules)
    int8 = QuantConfig("int8", compute_dtype="fp32")  # only its quant type is used per layer
    unknown = promoted - {name for name, _ in targets}
    if unknown:
        raise ValueError(f"int8_modules {sorted(unknown)[:3]} are not layers this model quantizes.")
    iterator = targets
    if show_progress and targets:
        from tqdm.auto import tqdm

        iterator = tqdm(targets, desc=f"Quantizing to {config.quant_type}", unit="layer", leave=False)
    for name, linear in iterator:
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError(
                f"Layer {name!r} has its weights on the meta device; load real weights before quantizing"
                " (e.g. build the model in configure_model with from_pretrained)."
            )
        if not weight.is_floating_point():
            raise ValueError(
                f"Layer {name!r} holds {weight.dtype} weights, which cannot be quantized again;"
                " load the 16/32-bit checkpoint, not an already-quantized one."
            )
        report.bytes_before += weight.numel() * weight.element_size()
        new = _make_quantized(bnb, linear, int8 if name in promoted else config, compute_dtype, device)
        if on_layer is not None:
            on_layer(name, weight.data, new)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
        report.quantized.append(name)
        report.bytes_after += quantized_nbytes(new)
    # PEFT reads these flags to dispatch its bnb-aware LoRA layers, which dequantize
    # correctly on merge instead of adding to the packed weight bytes.
    model.is_loaded_in_4bit = config.quant_type != "int8"
    model.is_loaded_in_8bit = config.quant_type == "int8" or bool(promoted)
    return report


def _make_quantized(
    bnb, linear: nn.Linear, config: QuantConfig, compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    has_bias = linear.bias is not None
    # Build on meta so the new layer never allocates a second full-precision weight.
    with torch.device("meta"):
        if config.quant_type == "int8":
            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
            )
        else:
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
                quant_storage=config.quant_storage,
            )
    data = linear.weight.data
    if config.quant_type == "int8":
        new.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    else:
        new.weight = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_type=config.quant_type,
            compress_statistics=config.double_quant,
            quant_storage=config.quant_storage,
            module=new,
        )
        if device.type == "cpu":
            quantize_layer(new, data)  # else the .to(device) below quantizes with bitsandbytes
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    if hasattr(new, "support_avx512bf16_for_cpu"):
        # On AVX512-BF16 CPUs bnb repacks 4-bit weights in place at the first eval
        # forward (undoing double quantization, and failing for layers whose width is
        # not a multiple of 32 after a train -> eval switch). Keep one format everywhere.
        new.support_avx512bf16_for_cpu = False
    # Moving a not-yet-quantized bnb parameter to a real device is what quantizes it.
    return new.to(device)


def quantized_nbytes(layer: nn.Module) -> int:
    """Bytes a bitsandbytes layer's weight takes, its quantization constants included."""
    weight = layer.weight
    total = weight.data.numel() * weight.data.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        tensors = [state.absmax, state.code]
        if getattr(state, "nested", False):
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    scb = getattr(weight, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def quantized_linear_bytes(out_features: int, in_features: int, quant_type: str, double_quant: bool) -> int:
    """Bytes of one quantized weight with its constants, as :func:`quantized_nbytes` counts them.

    NF4/FP4: 4 bits per weight and a scale per 64 weights: fp32 (4.5 bits per weight), or with
    double quantization uint8 plus an fp32 scale per 256 blocks (4.127 bits per weight).
    Int8: a byte per weight and an fp32 scale per output row.
    """
    n = out_features * in_features
    if quant_type == "int8":
        return n + 4 * out_features
    blocks = -(-n // 64)
    code = 16 * 4  # the 16-value NF4/FP4 code book
    if not double_quant:
        return -(-n // 2) + 4 * blocks + code
    # uint8 block scales, their fp32 scales per 256 blocks, the 256-value 8-bit code book, the fp32 offset.
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 256 * 4 + code + 4


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layer computes with."""
    bnb = require_bitsandbytes()
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    else:  # LLM.int8: int8 rows scaled by their absmax / 127
        dense = weight.CB.float() * weight.SCB.float().unsqueeze(1) / 127.0
    return dense.reshape(layer.out_features, layer.in_features)
