"""Token-level language-model metrics as one torchmetrics ``Metric`` (DDP-synced)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

IGNORE_INDEX = -100


def reset_outside_inference(*metrics) -> None:
    """Reset metrics so that their fresh states are normal tensors.

    ``trainer.validate``/``test`` run under ``torch.inference_mode``; states re-created
    there are inference tensors, and the next in-place update during ``fit`` (which
    validates without inference mode) would fail ("Inplace update to inference tensor").
    """
    with torch.inference_mode(False):
        for metric in metrics:
            metric.reset()


def answer_positions(labels: Tensor) -> Tensor:
    """Sequence positions whose next token is scored in at least one row of the batch."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def token_nll(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL and counted tokens of ``logits`` against ``target`` (what a training step needs).

    ``logits[:, i]`` predicts ``target[:, i]``; targets of ``-100`` don't count.
    """
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (target != IGNORE_INDEX).sum()


def token_stats(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`token_nll`'s sums, and the correct predictions between them."""
    nll, count = token_nll(logits, target)
    # A pass over the whole (tokens x vocab) logits: evaluation only.
    correct = ((logits.argmax(-1) == target) & (target != IGNORE_INDEX)).sum()
    return nll, correct, count


def shifted_token_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`token_stats` for full-length logits and labels aligned with the inputs (transformers style)."""
    return token_stats(logits[:, :-1], labels[:, 1:])


class TokenMetrics(Metric):
    """Mean next-token loss, perplexity and token accuracy over the answer tokens."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll: Tensor, correct: Tensor, count: Tensor) -> None:
        """Add sums from :func:`shifted_token_stats`."""
        self.nll += nll.detach().double()
        self.correct += correct
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        """``loss`` (mean NLL), ``ppl`` and ``token_acc``."""
        if self.count == 0:
            nan = torch.tensor(math.nan)
            return {"loss": nan, "ppl": nan, "token_acc": nan}
        loss = (self.nll / self.count).float()
        return {"loss": loss, "ppl": torch.exp(loss), "token_acc": (self.correct / self.count).float()}
