"""Less repeated work under gradient checkpointing on CPU, with bit-identical results.

Non-reentrant checkpointing runs each block's forward twice: once in the forward pass
(keeping nothing), once again in the backward pass to rebuild what the backward needs. With
a 4-bit base and LoRA dropout, stock bitsandbytes and PEFT then do per layer and step:

- three dequantizations of each 4-bit weight: forward, recompute, and again in the backward;
- two dropout masks for each adapter: drawn in the forward, drawn again in the recompute
  (the same mask, since checkpointing restores the RNG state first).

On CPU, where both are expensive (torch's CPU Bernoulli draws one 64-bit number per element),
:func:`reuse_recomputation` removes the repeats:

- ``ReuseLinear4bit`` keeps the dense weight it dequantized in the recompute for the backward
  that follows right after, one block at a time (a block's dense weights, freed after its
  backward), so each weight is dequantized twice instead of three times;
- ``ReplayDropout`` keeps each mask drawn in the forward, packed to one bit per element, and
  replays it in the recompute when the RNG state there equals the state it was drawn from,
  i.e. exactly when a fresh draw would give the same mask. It then moves the RNG to where the
  draw would have left it, so later random ops see the same stream.

Two more repeats go on the way: the block scales of double quantization are dequantized once at
the swap instead of at every dequantization, and PEFT's LoRA wrapper adds its term without first
copying the base output (``lightning_qlora.cpu.lora_nocopy``).

Outputs, gradients and RNG streams equal the stock path bit for bit (``tests/cpu/test_recompute.py``).
On GPU, and outside checkpointed blocks, both classes behave exactly like the ones they replace.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
from torch import nn

from lightning_qlora.core.bnb import require_bitsandbytes
from lightning_qlora.cpu.dropout import dropout, dropout_table, keep_mask, pack_mask, unpack_mask
from lightning_qlora.cpu.lora_nocopy import lora_linear4bit

# Masks waiting for their recompute take 1 bit per dropout input element; past this, draw again.
MAX_KEPT_BYTES = 256 * 2**20
_MIN_BUFFER = 2**20


def in_backward() -> bool:
    """Whether autograd is running a backward pass here (a checkpoint recompute runs inside one)."""
    return torch._C._current_graph_task_id() != -1


class _FirstForward(threading.local):
    """How deep this thread is inside :func:`checkpoint_reentrant`'s first (no-grad) forward."""

    depth = 0


_first_forward = _FirstForward()


def in_checkpointed_forward() -> bool:
    """Whether this is the first forward of a checkpointed block, whose saved tensors are dropped.

    Non-reentrant checkpointing shows itself by its saved-tensor hooks; reentrant checkpointing
    has none, so :func:`checkpoint_reentrant` marks its first forward.
    """
    if _first_forward.depth and not in_backward():
        return True
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")


def checkpoint_reentrant(function: Any, *args: Any, **kwargs: Any) -> Any:
    """torch's reentrant checkpoint (PEFT's default), its first forward marked for the reuse above.

    The backward recomputes a block and runs a backward through it at once, then frees all of it;
    non-reentrant checkpointing frees the recomputed tensors one by one between new gradients,
    which leaves glibc's heap larger (``bench/README.md``, "Why we lose where we lose").
    """
    from torch.utils.checkpoint import checkpoint

    kwargs["use_reentrant"] = True
    _first_forward.depth += 1
    try:
        return checkpoint(function, *args, **kwargs)
    finally:
        _first_forward.depth -= 1


def use_reentrant_checkpointing(model: nn.Module) -> int:
    """Make each checkpointed transformers layer of ``model`` use :func:`checkpoint_reentrant`; the count."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(module, GradientCheckpointingLayer) and func is not None and module.gradient_checkpointing:
            keep = dict(getattr(func, "keywords", None) or {})
            keep.pop("use_reentrant", None)
            module._gradient_checkpointing_func = functools.partial(checkpoint_reentrant, **keep)
            layers += 1
    return layers


class _Pending(threading.local):
    """Masks drawn in checkpointed forwards, waiting for their recompute, keyed by what determines them.

    A Bernoulli mask is a function of the RNG state it is drawn from, its shape and ``p``: an entry
    that matches all three is exactly the mask a fresh draw would give, whichever layer asks.
    Entries live in one buffer that is reused from the start whenever nothing is waiting: kept as
    separate small tensors, they sat between the forward's freed activations on the heap and
    raised the peak RSS (``bench/README.md``).
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[int, tuple[int, ...], float], tuple[torch.Tensor, ...]] = {}
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.offset = 0
        self.clear_queued = False

    def clear_after_backward(self) -> None:
        """Drop what this backward leaves unreplayed (a forward that got no backward, or no matching state)."""
        if not self.clear_queued:
            self.clear_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._clear)

    def _clear(self) -> None:
        self.entries.clear()
        self.offset = 0
        self.clear_queued = False

    @staticmethod
    def key(state: torch.Tensor, shape: torch.Size, p: float) -> tuple[int, tuple[int, ...], float]:
        return hash(state.numpy().tobytes()), tuple(shape), p

    def keep(self, key: tuple[int, tuple[int, ...], float], *tensors: torch.Tensor) -> None:
        if not self.entries:
            self.offset = 0
        need = sum(_aligned(t.numel()) for t in tensors)
        if self.offset + need > self.buffer.numel():
            size = max(_MIN_BUFFER, 2 * self.buffer.numel(), 2 * need)
            if size > MAX_KEPT_BYTES:
                self.entries.clear()  # the recomputes then draw again, as stock checkpointing does
                return
            # Entries still waiting keep the old buffer alive through their views.
            self.buffer, self.offset = torch.empty(size, dtype=torch.uint8), 0
        views = []
        for t in tensors:
            view = self.buffer[self.offset : self.offset + t.numel()]
            views.append(view.copy_(t.reshape(-1)))
            self.offset += _aligned(t.numel())
        self.entries[key] = tuple(views)

    def take(self, key: tuple[int, tuple[int, ...], float], state: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        entry = self.entries.get(key)
        if entry is None or not torch.equal(entry[0], state):
            return None
        del self.entries[key]
        return entry[1:]


def _aligned(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


_pending = _Pending()


class ReplayDropout(nn.Dropout):
    """``nn.Dropout`` that replays a checkpointed forward's mask in the recompute instead of redrawing it.

    Args:
        p: The drop probability.
        inplace: As in ``nn.Dropout`` (an inplace dropout is never replayed).
        fast_masks: Draw CPU masks with :func:`lightning_qlora.cpu.dropout.keep_mask` (8 random bits per
            element, the same distribution) instead of torch's ``bernoulli_`` (64): a different mask
            stream, several times cheaper. ``False`` gives torch's masks bit for bit.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, fast_masks: bool = False) -> None:
        super().__init__(p, inplace)
        self.fast_masks = fast_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        if x.numel() % 8:
            return self._draw(x)
        if in_backward():
            _pending.clear_after_backward()
            state = torch.get_rng_state()
            kept = _pending.take(_pending.key(state, x.shape, self.p), state)
            if kept is None:
                return self._draw(x)
            after, packed = kept
            torch.set_rng_state(after.clone())  # set_rng_state ignores a view's offset
            return x * unpack_mask(packed, x.shape, dropout_table(self.p, x.dtype))
        if not in_checkpointed_forward():
            return self._draw(x)
        before = torch.get_rng_state()
        keep = keep_mask(x.shape, self.p) if self.fast_masks else self._torch_keep(x)
        packed = pack_mask(keep)
        _pending.keep(_pending.key(before, x.shape, self.p), before, torch.get_rng_state(), packed)
        return x * unpack_mask(packed, x.shape, dropout_table(self.p, x.dtype))

    def _torch_keep(self, x: torch.Tensor) -> torch.Tensor:
        # The same draw as torch's CPU dropout, so that the mask and the output are the stock ones.
        return torch.empty_like(x).bernoulli_(1 - self.p).bool()

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p) if self.fast_masks else super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fast_masks={self.fast_masks}"


def _dequantize(weight: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight, computed as bitsandbytes' CPU forward does (straight to ``dtype``)."""
    absmax = _block_scales(state) if state.nested else state.absmax
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, dtype
    )


def _block_scales(state: Any) -> torch.Tensor:
    """A double-quantized weight's fp32 block scales, dequantized once and kept on its ``QuantState``.

    The frozen weight's scales never change, so they need not be dequantized twice a step; kept
    in fp32, they take 4 bytes per 64 weights.
    """
    cached = getattr(state, "_dense_absmax", None)
    if cached is None or cached[0] is not state.absmax:
        nested = state.state2
        scales = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, nested.absmax, nested.code, nested.blocksize, torch.float32
        )
        cached = state._dense_absmax = (state.absmax, scales + state.offset)
    return cached[1]


class _DequantizeOnce(torch.autograd.Function):
    """``x @ dequantize(W).T + b`` that hands a recompute's dense ``W`` to the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: Any) -> torch.Tensor:
        dense = _dequantize(weight, state, x.dtype)
        out = nn.functional.linear(x, dense, bias)
        ctx.state = state
        # Checkpointing matches saved tensors by position and metadata, so the first forward
        # saves the dense weight too; its saved tensors are dropped, so that costs nothing.
        ctx.dense = in_backward() or in_checkpointed_forward()
        ctx.save_for_backward(dense if ctx.dense else weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if not ctx.dense:
                weight = _dequantize(weight, ctx.state, grad.dtype)
            grad_x = torch.matmul(grad, weight)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


_REUSE_CLASS: type | None = None


def _reuse_linear4bit() -> type:
    """``ReuseLinear4bit``, built on first use so that importing this module needs no bitsandbytes."""
    global _REUSE_CLASS
    if _REUSE_CLASS is None:
        bnb = require_bitsandbytes()

        class ReuseLinear4bit(bnb.nn.Linear4bit):
            """``bnb.nn.Linear4bit`` whose CPU training forward dequantizes once per forward/backward pair."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
                state = getattr(self.weight, "quant_state", None)
                if (
                    x.device.type != "cpu"
                    or state is None
                    or getattr(state, "packing_format_for_cpu", False)
                    or not (torch.is_grad_enabled() and x.requires_grad)
                ):
                    return super().forward(x)
                dtype = self.compute_dtype or x.dtype
                bias = None if self.bias is None else self.bias.to(dtype)
                return _DequantizeOnce.apply(x.to(dtype), self.weight, bias, state).to(x.dtype)

        ReuseLinear4bit.__module__ = __name__
        ReuseLinear4bit.__qualname__ = "ReuseLinear4bit"
        _REUSE_CLASS = ReuseLinear4bit
    return _REUSE_CLASS


def __getattr__(name: str) -> Any:
    # Lets pickle find the lazily built class (a module that holds one can be saved and loaded).
    if name == "ReuseLinear4bit":
        return _reuse_linear4bit()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reuse_recomputation(model: nn.Module, fast_dropout: bool = False) -> tuple[int, int]:
    """Swap ``model``'s 4-bit layers and LoRA dropouts for the reusing ones, in place.

    Call it after adapters are added. It changes no weights and no results, only how often
    a checkpointed step dequantizes and draws masks on CPU.

    Args:
        model: The model, with its adapters.
        fast_dropout: Draw the LoRA dropout masks on CPU from 8 random bits per element
            (:mod:`lightning_qlora.cpu.dropout`): the same distribution as torch's, another stream.

    Returns:
        ``(4-bit layers, dropout layers)`` swapped.
    """
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    bnb = require_bitsandbytes()
    layer_class, lora_class = _reuse_linear4bit(), lora_linear4bit()
    layers = dropouts = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = layer_class
            layers += 1
            state = getattr(module.weight, "quant_state", None)
            if state is not None and state.nested and module.weight.device.type == "cpu":
                # Now, at setup, rather than among the first step's activations, where these small
                # tensors would pin freed heap pages.
                _block_scales(state)
        elif type(module) is PeftLinear4bit:
            module.__class__ = lora_class  # no defensive copy of the base output
        lora_dropout = getattr(module, "lora_dropout", None)
        if isinstance(lora_dropout, nn.ModuleDict):
            for name, drop in lora_dropout.items():
                if type(drop) is nn.Dropout and drop.p > 0:
                    lora_dropout[name] = ReplayDropout(drop.p, drop.inplace, fast_masks=fast_dropout)
                    dropouts += 1
    return layers, dropouts
