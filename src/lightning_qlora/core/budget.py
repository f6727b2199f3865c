"""Precision budget: keep the layers 4 bits hurt most in 8 bits, within a memory allowance.

NF4's error is nearly the same in every layer (about 9% of the weight norm), but what it
costs the model differs: with a calibration batch the planner ranks layers by their output
error, otherwise by weight error. Each promoted layer moves from NF4 (4.127 bits per
weight) to LLM.int8 (8 bits plus a scale per row), which cuts its error about twelvefold;
promotion goes greediest-first by error removed per extra byte, until the allowance
(a fraction of the 4-bit base's bytes) is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_qlora.core.quant_error import measure_quant_error
from lightning_qlora.core.quantize import QuantConfig, quantized_linear_bytes


@dataclass(frozen=True)
class BudgetPlan:
    """Which layers go to 8 bits, and what that costs."""

    promoted: tuple[str, ...]
    extra_bytes: int
    allowance_bytes: int
    base_bytes: int

    def summary(self) -> str:
        """One line for the log."""
        pct = 100 * self.extra_bytes / self.base_bytes if self.base_bytes else 0.0
        return (
            f"precision budget: {len(self.promoted)} layers kept in int8, +{self.extra_bytes / 2**20:.2f} MiB"
            f" (+{pct:.1f}% of the {self.base_bytes / 2**20:.1f} MiB 4-bit base; allowance"
            f" {self.allowance_bytes / 2**20:.2f} MiB)"
        )


def plan_budget(
    model: nn.Module, config: QuantConfig, fraction: float, calibration: torch.Tensor | None = None
) -> BudgetPlan:
    """Choose the layers to keep in 8 bits so that the base grows by at most ``fraction``.

    Args:
        model: The unquantized model.
        config: The 4-bit quantization the rest of the model gets.
        fraction: Allowed growth of the quantized base, e.g. ``0.05`` for +5%.
        calibration: Optional ``input_ids`` to rank layers by their output error.

    Raises:
        ValueError: ``fraction`` is not positive, the base is not 4-bit, or no layer fits.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or fraction <= 0:
        raise ValueError(f"keep_high_precision={fraction!r} should be a positive fraction, e.g. 0.05 for +5% memory.")
    if config.quant_type == "int8":
        raise ValueError("keep_high_precision promotes 4-bit layers to int8; it needs quant_type nf4 or fp4.")
    errors = measure_quant_error(model, config, calibration)
    int8 = QuantConfig("int8", compute_dtype="fp32")
    int8_errors = {e.name: e for e in measure_quant_error(model, int8, calibration)}
    costs, gains = {}, {}
    base = 0
    for e in errors:
        out_f, in_f = e.shape
        four = quantized_linear_bytes(out_f, in_f, config.quant_type, config.double_quant)
        base += four
        costs[e.name] = quantized_linear_bytes(out_f, in_f, "int8", False) - four
        now = e.output_rel_error if e.output_rel_error is not None else e.weight_rel_error
        after = int8_errors[e.name]
        then = after.output_rel_error if after.output_rel_error is not None else after.weight_rel_error
        gains[e.name] = now - then
    allowance = int(fraction * base)
    cheapest = min(costs.values())
    if cheapest > allowance:
        need = cheapest / base
        raise ValueError(
            f"keep_high_precision={fraction} allows {allowance / 2**20:.3f} MiB, but the smallest layer needs"
            f" {cheapest / 2**20:.3f} MiB more in int8; raise it to at least {need:.4f}."
        )
    promoted, spent = [], 0
    for name in sorted(costs, key=lambda n: gains[n] / costs[n], reverse=True):
        if spent + costs[name] <= allowance:
            promoted.append(name)
            spent += costs[name]
    return BudgetPlan(tuple(promoted), spent, allowance, base)
