"""Optimizers and the warmup + cosine schedule shared by the LightningModules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_qlora.core.checks import Check, Checked, is_int, is_number, one_of

OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit")


@dataclass(frozen=True)
class OptimizerConfig(Checked):
    """The optimizer and its warmup + cosine schedule (the ``optimizer`` config group).

    Args:
        optimizer: ``"adamw"``, ``"paged_adamw_8bit"`` (CUDA only), or ``"auto"``: paged 8-bit
            AdamW on CUDA without FSDP, AdamW elsewhere (see :func:`resolve_optimizer`).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay.
        min_lr_ratio: Final LR as a fraction of ``lr``.
    """

    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1

    # The rules, here only: the constructor raises on them, and the run config check
    # (app/config.py) reports them under the optimizer.* keys (or their trainer.* aliases).
    CHECKS = (
        one_of("optimizer", OPTIMIZERS),
        Check(
            "lr",
            is_number(0, strict=True),
            "a positive number",
            "2e-4",
            python="{name} should be positive, but got {name}={value!r}; QLoRA commonly uses 2e-4.",
        ),
        Check("weight_decay", is_number(0), "a number >= 0"),
        Check(
            "warmup_steps",
            is_int(0),
            "an integer >= 0",
            python="{name} should be >= 0 (an integer), but got {value!r}.",
        ),
        Check("min_lr_ratio", is_number(0, high=1, closed=True), "in [0, 1]", "0.1"),
    )

    def __post_init__(self) -> None:
        self.check()


def check_optim_args(optimizer: str, lr: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float) -> None:
    """Fail early, naming the bad value and a fix (the rules of :class:`OptimizerConfig`)."""
    OptimizerConfig(optimizer, lr, weight_decay, warmup_steps, min_lr_ratio)


def resolve_optimizer(optimizer: str, device: torch.device | str, sharded: bool = False) -> str:
    """What ``optimizer`` means on ``device``: ``"auto"`` is bitsandbytes' paged 8-bit AdamW on CUDA
    (its state pages to host memory under pressure) unless the model is sharded (paged AdamW had
    checkpointing bugs under FSDP), and AdamW elsewhere. Other names stay as they are.
    """
    if optimizer != "auto":
        return optimizer
    return "paged_adamw_8bit" if torch.device(device).type == "cuda" and not sharded else "adamw"


def build_optimizer(
    params: Iterable[torch.nn.Parameter], optimizer: str, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged 8-bit AdamW on CUDA."""
    params = list(params)
    if not params:
        raise ValueError(
            "The model has no trainable parameters; add Trainer(plugins=[QLoRAPlugin()]) so that LoRA adapters"
            " are injected, or unfreeze some parameters."
        )
    if optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ValueError(
                f"optimizer='paged_adamw_8bit' needs a CUDA device, but the model is on {device.type};"
                " use optimizer='adamw'."
            )
        from lightning_qlora.core.bnb import require_bitsandbytes

        return require_bitsandbytes().optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # PyTorch's fused AdamW on CPU, whose default is a per-tensor loop over hundreds of small adapter
    # tensors (bench/README.md has the timing). CUDA keeps its default
    # (foreach): a fused step there unscales fp16 gradients inside, where clipping cannot reach.
    fused = all(p.is_floating_point() and p.device.type == "cpu" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def configure_optimizers(module) -> dict:
    """AdamW (or paged 8-bit) over the trainable parameters, with warmup + cosine per step.

    ``optimizer="auto"`` is resolved here, where the device and the strategy are known.
    Reads ``optimizer``, ``lr``, ``weight_decay``, ``warmup_steps``, ``min_lr_ratio`` from
    ``module.hparams`` and the total steps from its Trainer.
    """
    hp = module.hparams
    params = [p for p in module.parameters() if p.requires_grad]
    name = resolve_optimizer(hp.optimizer, module.device, isinstance(module.trainer.strategy, FSDPStrategy))
    optimizer = build_optimizer(params, name, hp.lr, hp.weight_decay, module.device)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, hp.warmup_steps, hp.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
