"""Chunked cross-entropy: the loss over the vocabulary without the full logits in memory.

With a full-sequence loss the logits are the largest activation of a step: scored tokens x vocab,
kept in fp32 for the loss backward (three copies). Here the output head's input is taken from a
forward pre-hook (the head itself is handed zero positions), and the head and the loss run over
``chunk_size`` scored tokens at a time, each chunk under activation checkpointing: the backward
recomputes one chunk's logits at a time, so at most one chunk's are alive.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from lightning_qlora.tasks.metrics import IGNORE_INDEX


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise a one-line ``ValueError`` unless ``chunk_size`` is None or a positive int."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"loss_chunk_size={chunk_size!r}: expected null (the whole loss at once) or a positive number of"
            " scored tokens per chunk, e.g. 1024."
        )


def output_head(model: nn.Module) -> nn.Linear:
    """The model's output head, if chunking can run it outside the model: a plain float Linear.

    Raises:
        ValueError: no head, a quantized head, or a model that changes the logits after its head.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():
        raise ValueError(
            f"loss_chunk_size needs an unquantized Linear output head, but the model's is {type(head).__name__};"
            " keep the head in high precision (the default) or set loss_chunk_size=null."
        )
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ValueError(
            f"loss_chunk_size: {type(model).__name__} transforms its logits after the head, which chunking"
            " would skip; set loss_chunk_size=null."
        )
    return head


@contextmanager
def hidden_at_head(head: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, the head's inputs are recorded and the head gets zero positions."""
    seen: list[Tensor] = []

    def take(module: nn.Module, args: tuple) -> tuple:
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield seen
    finally:
        handle.remove()


def _chunk_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_nll(hidden: Tensor, head: nn.Linear, target: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Summed NLL and counted tokens, as ``token_nll(head(hidden), target)``, ``chunk_size`` tokens at a time.

    Args:
        hidden: The head's input, ``(..., hidden)``, aligned with ``target`` ``(...)``.
        head: The output head (see :func:`output_head`).
        target: Token ids; ``-100`` doesn't count.
        chunk_size: Scored tokens per chunk.
    """
    flat, ids = hidden.reshape(-1, hidden.size(-1)), target.reshape(-1)
    scored = ids != IGNORE_INDEX
    # Unscored positions cost nothing here: only scored rows go through the head.
    flat, ids = flat[scored], ids[scored]
    total = flat.float().sum() * 0.0  # a graph even when nothing is scored, as cross_entropy's sum
    for start in range(0, ids.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_nll, flat[part], head.weight, head.bias, ids[part], use_reentrant=False)
    return total, scored.sum()
