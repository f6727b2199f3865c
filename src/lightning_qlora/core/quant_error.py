"""How much each Linear layer loses to quantization, measured before quantizing.

``quantize_model`` discards the full-precision weights, so the error has to be measured
on the full-precision model: each layer that ``quantize_model`` would replace is
round-tripped through the same bitsandbytes kernels, and compared with the original.
With a calibration batch, the layer outputs on real inputs are compared too, which is
what the adapters actually have to compensate.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_qlora.core.bnb import require_bitsandbytes
from lightning_qlora.core.quantize import QuantConfig, dequantized_weight, select_linears
from lightning_qlora.core.quantize4bit import quantize_4bit

# bitsandbytes' default 4-bit block size on CPU and CUDA (Params4bit(blocksize=None)).
BLOCKSIZE = 64
CSV_NAME = "quant_errors.csv"
PNG_NAME = "quant_errors.png"


@dataclass(frozen=True)
class LayerError:
    """Quantization error of one Linear layer.

    Attributes:
        name: Full module name, e.g. ``model.layers.0.mlp.down_proj``.
        shape: Weight shape ``(out_features, in_features)``.
        numel: Number of weights.
        weight_rel_error: ``||W - deq(q(W))||_F / ||W||_F``.
        output_rel_error: ``||X W^T - X deq^T||_F / ||X W^T||_F`` on the calibration inputs;
            ``None`` without calibration, or when the layer did not run on them.
    """

    name: str
    shape: tuple[int, int]
    numel: int
    weight_rel_error: float
    output_rel_error: float | None = None


def quant_targets(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The Linear layers that :func:`~lightning_qlora.core.quantize.quantize_model` would replace, in order.

    Raises:
        ValueError: a ``skip_modules`` entry matches nothing, or the model is already quantized.
    """
    targets, _, already = select_linears(model, config)
    if already:
        layer = model.get_submodule(already[0])
        raise ValueError(
            f"{already[0]!r} is already a bitsandbytes {type(layer).__name__}, whose original weights are gone;"
            " measure the full-precision model, before quantize_model."
        )
    return targets


def roundtrip(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """``deq(q(weight))`` with the kernels and settings the quantized layer uses, as float32."""
    functional = require_bitsandbytes().functional
    if config.quant_type == "int8":
        # Int8Params quantizes the fp16 cast row-wise (absmax / 127 per output row).
        data, row_scale, _ = functional.int8_vectorwise_quant(weight.to(torch.float16))
        return functional.int8_vectorwise_dequant(data, row_scale).float()
    done = quantize_4bit(weight, BLOCKSIZE, config.quant_type, config.double_quant)  # the same bytes, on CPU
    packed, state = done or functional.quantize_4bit(
        weight, blocksize=BLOCKSIZE, compress_statistics=config.double_quant, quant_type=config.quant_type
    )
    return functional.dequantize_4bit(packed, state).float()


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    norm = ref.norm().item()
    return diff.norm().item() / norm if norm else 0.0


def check_calibration(calibration: object, vocab_size: int | None) -> torch.Tensor:
    """Check that ``calibration`` is a ``[batch, seq]`` tensor of token ids below ``vocab_size``."""
    fix = "pass input_ids as a 2-D integer tensor [batch, seq], e.g. tokenizer(texts, return_tensors='pt').input_ids"
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(f"calibration is a {type(calibration).__name__}, not a tensor; {fix}.")
    shape, dtype = tuple(calibration.shape), calibration.dtype
    if calibration.dim() != 2 or calibration.is_floating_point() or calibration.is_complex() or dtype == torch.bool:
        raise ValueError(f"calibration has shape {shape} and dtype {dtype}; {fix}.")
    if calibration.numel() == 0:
        raise ValueError(f"calibration has shape {shape}, which holds no tokens; {fix}.")
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(
            f"calibration ids span [{low}, {high}], outside the model's vocabulary [0, {vocab_size});"
            " tokenize with the model's own tokenizer."
        )
    return calibration.long()


def _vocab_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def measure_quant_error(
    model: nn.Module, config: QuantConfig | None = None, calibration: torch.Tensor | None = None
) -> list[LayerError]:
    """Relative error of every layer that ``quantize_model(model, config)`` would quantize.

    Run it on the full-precision model; it does not change the model.

    Args:
        model: The unquantized model, e.g. from ``load_model``.
        config: The quantization you plan to use; defaults to NF4 with double quantization.
        calibration: Optional ``input_ids`` ``[batch, seq]``; one no-grad forward of ``model``
            on them gives each layer's input, for the output error.

    Returns:
        One :class:`LayerError` per target layer, in module order.

    Raises:
        ValueError: the model is already quantized, has no layer to quantize, holds meta or
            non-float weights, or ``calibration`` is not a 2-D tensor of ids in the vocabulary.
    """
    config = config or QuantConfig()
    targets = quant_targets(model, config)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear layer to quantize, so there is no error to measure.")
    for name, linear in targets:
        if linear.weight.device.type == "meta" or not linear.weight.is_floating_point():
            raise ValueError(
                f"Layer {name!r} holds {linear.weight.dtype} weights on {linear.weight.device.type};"
                " measure a model with real 16/32-bit weights."
            )
    if calibration is not None:
        calibration = check_calibration(calibration, _vocab_size(model))

    # name -> (weight error, squared output error sum, squared output sum); layers may run more than once.
    found: dict[str, list] = {}

    def measure(name: str, linear: nn.Linear, inputs: torch.Tensor | None) -> None:
        weight = linear.weight.detach().float()
        deq = roundtrip(linear.weight.detach(), config)
        if name not in found:
            found[name] = [_rel(weight - deq, weight), 0.0, 0.0]
        if inputs is not None:
            x = inputs.detach().reshape(-1, linear.in_features).float()
            ref = x @ weight.T
            found[name][1] += (ref - x @ deq.T).pow(2).sum().item()
            found[name][2] += ref.pow(2).sum().item()

    if calibration is not None:
        # Measure inside the hooks so that no layer's input or dequantized weight outlives its call.
        hooks = [
            linear.register_forward_hook(lambda m, args, out, name=name: measure(name, m, args[0]))
            for name, linear in targets
        ]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                device = targets[0][1].weight.device
                model(calibration.to(device))
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)

    errors = []
    with torch.no_grad():
        for name, linear in targets:
            if name not in found:
                measure(name, linear, None)
            weight_error, diff, ref = found[name]
            output_error = (diff / ref) ** 0.5 if ref else None
            shape = (linear.out_features, linear.in_features)
            errors.append(LayerError(name, shape, linear.weight.numel(), weight_error, output_error))
    return errors


def summarize(errors: list[LayerError]) -> str:
    """One line: the mean relative errors and the worst layer."""
    if not errors:
        raise ValueError("errors is empty; pass the list that measure_quant_error returns.")
    mean = sum(e.weight_rel_error for e in errors) / len(errors)
    worst = max(errors, key=lambda e: e.weight_rel_error)
    line = (
        f"{len(errors)} layers: mean relative weight error {mean:.4f},"
        f" worst {worst.name} ({worst.weight_rel_error:.4f})"
    )
    outputs = [e for e in errors if e.output_rel_error is not None]
    if outputs:
        mean_out = sum(e.output_rel_error for e in outputs) / len(outputs)
        worst_out = max(outputs, key=lambda e: e.output_rel_error)
        line += f"; mean output error {mean_out:.4f}, worst {worst_out.name} ({worst_out.output_rel_error:.4f})"
    return line


def write_error_report(errors: list[LayerError], directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``quant_errors.csv`` (one row per layer) and ``quant_errors.png`` (a bar per layer).

    Returns:
        ``(csv_path, png_path)``.
    """
    if not errors:
        raise ValueError("errors is empty; pass the list that measure_quant_error returns.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = directory / CSV_NAME, directory / PNG_NAME
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "out_features", "in_features", "numel", "weight_rel_error", "output_rel_error"])
        for e in errors:
            output = "" if e.output_rel_error is None else f"{e.output_rel_error:.6g}"
            writer.writerow([e.name, *e.shape, e.numel, f"{e.weight_rel_error:.6g}", output])
    _plot(errors, png_path)
    return csv_path, png_path


def _plot(errors: list[LayerError], path: Path) -> None:
    # A bare Figure on the Agg canvas: no pyplot, so the caller's backend and figures are untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(errors)
    fig = Figure(figsize=(8, 1.5 + 0.14 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = range(n)
    ax.barh(rows, [e.weight_rel_error for e in errors], height=0.8, color="tab:blue", label="weight")
    if any(e.output_rel_error is not None for e in errors):
        outputs = [e.output_rel_error or 0.0 for e in errors]
        ax.plot(outputs, rows, "o", markersize=3, color="tab:red", label="output (calibration)")
        ax.legend(loc="lower right")
    mean = sum(e.weight_rel_error for e in errors) / n
    ax.axvline(mean, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(list(rows), [e.name for e in errors], fontsize=6 if n > 40 else 8)
    ax.set_ylim(n - 0.5, -0.5)  # first layer at the top
    ax.set_xlabel("relative error (Frobenius)")
    ax.set_title(f"Quantization error per layer (dashed: mean weight error {mean:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


class ErrorRecorder:
    """``quantize_model``'s ``on_layer`` hook: each layer's weight error, measured as it is quantized.

    This costs one dequantization per layer, with no second pass over the model (QLoRAPlugin
    uses it at setup). For output errors on real inputs, use :func:`measure_quant_error`.
    """

    def __init__(self) -> None:
        self.errors: list[LayerError] = []

    def __call__(self, name: str, weight: torch.Tensor, layer: nn.Module) -> None:
        dense = dequantized_weight(layer)
        original = weight.detach().float().reshape(dense.shape).to(dense.device)
        self.errors.append(LayerError(name, tuple(dense.shape), dense.numel(), _rel(original - dense, original)))
