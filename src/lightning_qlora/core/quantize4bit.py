"""NF4/FP4 quantization of CPU weights: bitsandbytes' own bytes, computed in cache-sized pieces.

bitsandbytes quantizes a CPU tensor with whole-tensor passes and a ``torch.bucketize`` over
the 15 bounds between code values, which makes quantizing most of setup's work. Here each
piece of 64K weights goes through the same arithmetic while it sits in cache, and the bound
search is one table lookup plus one comparison:

- the scaled weights lie in [-1, 1], cut into ``_CELLS`` equal cells;
- the table holds, per cell, how many bounds lie below it and the one bound near it;
- the index is the count of bounds below the weight, as ``bucketize`` returns.

The result is checked once per process and setting against bitsandbytes' own
:func:`bitsandbytes.functional.quantize_4bit`, bounds included; if any byte differs, or a
weight is not finite, :func:`quantize_4bit` returns ``None`` and the caller quantizes with
bitsandbytes.
"""

from __future__ import annotations

import functools
import logging

import torch

from lightning_qlora.core.bnb import require_bitsandbytes

log = logging.getLogger(__name__)

_CELLS = 4096  # enough that no cell and its two neighbours hold two bounds (FP4's closest are 1/384 apart)
_PIECE = 65536  # weights per piece: the piece's temporaries stay in a core's cache


@functools.cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell: the bounds below its neighbourhood (uint8), the one bound inside it (+inf if none); the code order."""
    bnb = require_bitsandbytes()
    code = bnb.functional.get_4bit_type(quant_type, device="cpu").float()
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2  # the midpoints bitsandbytes searches
    width = 2.0 / _CELLS
    exact = bounds.double()
    below = torch.empty(_CELLS + 1, dtype=torch.uint8)
    near = torch.full((_CELLS + 1,), float("inf"))
    for cell in range(_CELLS + 1):
        # A weight's computed cell is off by at most one from its true one: look one cell either side.
        low, high = -1 + (cell - 1) * width, -1 + (cell + 2) * width
        inside = bounds[(exact >= low) & (exact < high)]
        if inside.numel() > 1:
            raise ValueError(f"{quant_type} has {inside.numel()} bounds within 3 cells; raise _CELLS")
        below[cell] = int((exact < low).sum())
        if inside.numel():
            near[cell] = inside[0]
    return below, near, order.to(torch.uint8)


def _indices(scaled: torch.Tensor, out: torch.Tensor, quant_type: str) -> None:
    """Write into ``out`` (uint8) the sorted-code index of each value of ``scaled`` (in [-1, 1])."""
    below, near, _ = _tables(quant_type)
    cell = scaled.add(1.0).mul_(_CELLS / 2).to(torch.int32).view(-1)
    torch.index_select(below, 0, cell, out=out.view(-1))
    out += scaled > near.index_select(0, cell).view_as(scaled)


def _pack(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(packed uint8 pairs, fp32 absmax per block)`` as bitsandbytes' CPU kernel makes them; None if not finite."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    low, high = torch.aminmax(blocks, dim=-1)
    absmax = torch.maximum(high, low.neg())  # |x|'s max without an |x| copy of the weight
    if rem:  # the partial block's absmax is stored clamped, the others are not
        absmax = torch.cat([absmax, flat[full:].abs().max().clamp(min=1e-38).unsqueeze(0)])
    if not bool(torch.isfinite(absmax).all()):
        return None
    # The same expressions as bitsandbytes: the reciprocal for whole blocks, a division for the rest.
    inverse = (1.0 / absmax[: blocks.shape[0]].clamp(min=1e-38)).view(-1, 1)
    q = torch.empty(n + n % 2, dtype=torch.uint8)
    rows = max(1, _PIECE // blocksize)
    for start in range(0, blocks.shape[0], rows):
        end = min(start + rows, blocks.shape[0])
        piece = (blocks[start:end] * inverse[start:end]).clamp_(-1, 1)
        _indices(piece, q[start * blocksize : end * blocksize].view_as(piece), quant_type)
    if rem:
        _indices(torch.clamp(flat[full:] / absmax[-1], -1, 1), q[full:n], quant_type)
    if n % 2:
        _indices(torch.zeros(1), q[n:], quant_type)  # bitsandbytes pads an odd count with a zero
    if quant_type != "nf4":
        q = _tables(quant_type)[2].index_select(0, q.to(torch.int32))
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


def _state(bnb, A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    """The ``QuantState`` ``bitsandbytes.functional.quantize_4bit`` builds around ``absmax``."""
    code = bnb.functional.get_4bit_type(quant_type, device=A.device)
    common = dict(shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type)
    if not double_quant:
        return bnb.functional.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    return bnb.functional.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def _quantize(A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool, storage: torch.dtype):
    bnb = require_bitsandbytes()
    packed = _pack(A, blocksize, quant_type)
    if packed is None:
        return None
    data, absmax = packed
    if storage != torch.uint8:
        data = data.squeeze().view(storage).unsqueeze(1)
    return data, _state(bnb, A, absmax, blocksize, quant_type, double_quant)


def _probe(blocksize: int, storage: torch.dtype, zero_tail: bool = False) -> torch.Tensor:
    """Weights whose blocks start with 1.0, so that the values after it meet every bound and its two
    neighbours exactly, plus signed zeros, +-1, a zero block, a partial last block (of noise or of
    zeros) and (for uint8 storage, which alone can hold it) an odd count."""
    bounds = torch.cat([(c[:-1] + c[1:]) / 2 for c in (_sorted_code("nf4"), _sorted_code("fp4"))])
    edges = torch.cat([bounds, bounds.nextafter(torch.tensor(2.0)), bounds.nextafter(torch.tensor(-2.0))])
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5])
    rows = 4 + 2 * (edges.numel() + special.numel()) // (blocksize - 1)
    noise = 0.3 * torch.randn(rows * (blocksize - 1), generator=torch.Generator().manual_seed(0))
    values = torch.cat([edges, special, noise])[: rows * (blocksize - 1)].view(rows, blocksize - 1)
    weight = torch.cat([torch.ones(rows, 1), values], dim=1)
    weight[-1] = 0.0
    tail = noise[: 37 if storage == torch.uint8 else 40]
    return torch.cat([weight.reshape(-1), torch.zeros_like(tail) if zero_tail else tail])


def _sorted_code(quant_type: str) -> torch.Tensor:
    return require_bitsandbytes().functional.get_4bit_type(quant_type, device="cpu").float().sort().values


@functools.cache
def _agrees(blocksize: int, quant_type: str, double_quant: bool, storage: torch.dtype) -> bool:
    """Whether this module's bytes equal the installed bitsandbytes' on :func:`_probe`, scaled per block."""
    bnb = require_bitsandbytes()
    try:
        for zero_tail in (False, True):
            weight = _probe(blocksize, storage, zero_tail)
            ours = _quantize(weight, blocksize, quant_type, double_quant, storage)
            data, state = bnb.functional.quantize_4bit(
                weight,
                blocksize=blocksize,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=storage,
            )
            # As bytes: packed pairs stored as floats can read as NaN, which never equals itself.
            if ours is None or not _equal(ours[0].view(torch.uint8), data.view(torch.uint8)):
                break
            if not _same_state(ours[1], state):
                break
        else:
            return True
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as err:
        log.debug("4-bit CPU quantizer unused (%s): %r", quant_type, err)
        return False
    log.debug("4-bit CPU quantizer unused: its %s bytes differ from bitsandbytes %s", quant_type, bnb.__version__)
    return False


def _same_state(a, b) -> bool:
    tensors = ("absmax", "code", "offset")
    if any(not _equal(getattr(a, k, None), getattr(b, k, None)) for k in tensors):
        return False
    if (a.state2 is None) != (b.state2 is None):
        return False
    nested = a.state2 is None or (_equal(a.state2.absmax, b.state2.absmax) and _equal(a.state2.code, b.state2.code))
    return nested and (a.shape, a.dtype, a.blocksize, a.quant_type) == (b.shape, b.dtype, b.blocksize, b.quant_type)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a is None and b is None


def quantize_4bit(
    weight: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    storage: torch.dtype = torch.uint8,
):
    """``bitsandbytes.functional.quantize_4bit`` for a CPU float weight: the same ``(data, QuantState)``.

    Returns ``None`` where bitsandbytes must do it: a weight off CPU or not floating point, a
    non-finite weight, or an installed bitsandbytes whose bytes differ from these.
    """
    if weight.device.type != "cpu" or not weight.is_floating_point() or quant_type not in ("nf4", "fp4"):
        return None
    if not _agrees(blocksize, quant_type, double_quant, storage):
        return None
    return _quantize(weight.contiguous(), blocksize, quant_type, double_quant, storage)


def quantize_layer(layer, data: torch.Tensor) -> bool:
    """Quantize a bitsandbytes ``Linear4bit``'s not-yet-quantized CPU weight from ``data`` as ``Params4bit`` would.

    Returns False, leaving the layer as it was, where :func:`quantize_4bit` does not apply.
    """
    param = layer.weight
    done = quantize_4bit(data, param.blocksize, param.quant_type, param.compress_statistics, param.quant_storage)
    if done is None:
        return False
    # What Params4bit._quantize does with bitsandbytes' own result.
    param.data, param.quant_state = done
    param.bnb_quantized = True
    layer.quant_state = param.quant_state
    return True
