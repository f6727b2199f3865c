"""Opt-in (``measure_quant_cost=true``): what 4 bits cost on this data, measured at setup.

The base is loaded unquantized and validated once, by a plain Lightning Trainer, before
QLoRAPlugin quantizes that very model. The run's "before" validation then measures the same
model (the same new head, adapters that start as a no-op) with its frozen weights quantized,
so the two validation losses differ only by the quantization. It costs one validation pass and
the unquantized model's memory, hence off by default.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig


def unquantized_val_loss(cfg: DictConfig, module: L.LightningModule, dm: L.LightningDataModule) -> float:
    """The validation loss of ``module``'s base before quantization, on the run's accelerator and in the
    precision the run computes in (fp32 on CPU, 16-bit mixed on GPU).

    ``module`` keeps the loaded base, which the run's QLoRAPlugin then quantizes in place.
    """
    precision = "32-true"
    if cfg.trainer.accelerator != "cpu":
        import torch

        precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return float(trainer.validate(module, dm, verbose=False)[0]["val_loss"])


def quant_cost(unquantized: float, quantized: float, quant_type: str) -> dict[str, Any]:
    """Both validation losses and the relative increase 4 bits (or int8) cause."""
    return {
        "quant_type": quant_type,
        "val_loss_unquantized": round(unquantized, 4),
        "val_loss_quantized": round(quantized, 4),
        "increase": round(quantized / unquantized - 1, 4),
    }


def describe(cost: dict[str, Any]) -> str:
    """One line: ``nf4 costs +1.2% loss on this data (validation loss 0.9000 unquantized -> 0.9108)``."""
    return (
        f"{cost['quant_type']} costs {cost['increase']:+.1%} loss on this data (validation loss"
        f" {cost['val_loss_unquantized']:.4f} unquantized -> {cost['val_loss_quantized']:.4f})"
    )
