"""Chunked cross-entropy: the loss over the vocabulary without the full logits in memory.

With a full-sequence loss the logits are the largest activation of a step: scored tokens x vocab
in fp32, and the plain loss keeps three more tensors of that size for its backward (log-softmax,
its gradient, the logits' gradient). Here the output head's input is taken from a forward
pre-hook (the head itself is handed zero positions), and the head and the loss run over
``chunk_size`` scored tokens at a time in two chunk-sized buffers. The loss is the last op of the graph, so
each chunk's gradient (softmax minus one-hot) is known in the forward: it is turned into the
head input's gradient there and the logits are dropped. The backward only scales what was kept,
so nothing is recomputed and the FLOPs are the plain path's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qlora.tasks.metrics import IGNORE_INDEX

# ``"auto"``'s chunk: one chunk's logits are 1024 x vocab fp32 (192 MiB at a 49k vocabulary), and
# fewer rows make the head's matmul re-read its whole weight too often (bench/README.md, "Chunked loss").
AUTO_CHUNK = 1024


def check_chunk_size(chunk_size: int | str | None) -> None:
    """Raise a one-line ``ValueError`` unless ``chunk_size`` is None, ``"auto"`` or a positive int."""
    if chunk_size is None or chunk_size == "auto":
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"loss_chunk_size={chunk_size!r}: expected auto (the default), null (the whole loss at once) or a"
            " positive number of scored tokens per chunk, e.g. 1024."
        )


def resolve_chunk_size(model: nn.Module, chunk_size: int | str | None, sharded: bool = False) -> int | None:
    """The chunk to use, or None for the whole loss at once.

    ``"auto"`` chunks by :data:`AUTO_CHUNK` where :func:`output_head` accepts the model's head and the
    strategy does not shard it (FSDP gathers the head's weight only inside the head's own call);
    elsewhere it is the whole loss. An explicit size is checked and kept.
    """
    if chunk_size != "auto":
        if chunk_size is not None:
            output_head(model)
        return chunk_size
    if sharded:
        return None
    try:
        output_head(model)
    except ValueError:
        return None
    return AUTO_CHUNK


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


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of ``linear(hidden, weight, bias)`` against ``target``, with its gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_size, needs):  # noqa: ANN001, ANN205
        need_hidden, need_weight, need_bias = needs
        rows, vocab = hidden.size(0), weight.size(0)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Two buffers for every chunk (logits, log-probabilities): fresh ones per chunk would be fresh
        # mappings to fault in. log_softmax + nll_loss are cross_entropy's own kernels, so one chunk's
        # sum is the plain path's to the bit.
        size = min(chunk_size, rows) * vocab
        buffer = torch.empty(2 * size, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk_size):
            part, ids = hidden[start : start + chunk_size], target[start : start + chunk_size]
            n = part.size(0) * vocab
            logits, logp = buffer[:n].view(-1, vocab), buffer[size : size + n].view(-1, vocab)
            if hidden.dtype == torch.float32:
                torch.mm(part, weight.t(), out=logits)
                if bias is not None:
                    logits.add_(bias)
            else:
                logits.copy_(F.linear(part, weight, bias))
            torch.log_softmax(logits, 1, out=logp)
            total += F.nll_loss(logp, ids, reduction="sum")
            if not (need_hidden or need_weight or need_bias):
                continue
            # d(sum NLL)/d(logits) = softmax - one-hot, made in place.
            grad = logp.exp_().scatter_add_(1, ids.unsqueeze(1), logp.new_full((ids.numel(), 1), -1.0))
            grad = grad if weight.dtype == torch.float32 else grad.to(weight.dtype)
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk_size])
            if need_weight:
                grad_weight.addmm_(grad.t().float(), part.float())
            if need_bias:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight, grad_bias) if t is not None))
        ctx.needs = needs
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        saved = list(ctx.saved_tensors)
        grads = []
        for need, dtype in zip(ctx.needs, (None, *ctx.dtypes), strict=True):
            if not need:
                grads.append(None)
                continue
            grad = saved.pop(0) * grad_total
            grads.append(grad if dtype is None else grad.to(dtype))
        return (*grads, None, None, None)


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
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (flat, head.weight, head.bias))
    nll = _LinearCrossEntropy.apply(flat, head.weight, head.bias, ids, chunk_size, needs)
    return nll, scored.sum()
