"""Exact Bernoulli dropout masks on CPU from 8 random bits per element instead of 64.

Torch's CPU ``bernoulli_(p)`` draws a 64-bit number from the Mersenne Twister for every element,
one element at a time: a visible share of a LoRA training step on CPU (``bench/README.md``).

:func:`keep_mask` draws the same distribution from one random byte per element: with
``k = 256 p``, a byte ``b`` drops its element when ``b < floor(k)``, keeps it when ``b > floor(k)``,
and the rare tie ``b == floor(k)`` (1 in 256) drops with probability ``k - floor(k)`` from a
53-bit uniform. So ``P(drop) = floor(k) / 256 + (k - floor(k)) / 256 = p`` to double precision,
the precision of torch's own draw, and elements stay independent. The mask stream is not
torch's: a run with these masks is as random as one with PEFT's, not bit-equal to it.

:func:`pack_mask` and :func:`unpack_mask` keep a mask at one bit per element, for the replay in
``lightning_qlora.cpu.recompute``.
"""

from __future__ import annotations

import math

import torch

_MIN_INT64 = -(2**63)
_GATHER_BITS = 0x0102040810204080  # multiplying 8 bytes of 0/1 by this gathers them into the top byte
# Row b: the 8 bits of byte b, lowest first (the order pack_mask packs them in).
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()
_DROPOUT_TABLES: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool CPU tensor of ``shape`` whose elements are independently ``True`` with probability ``1 - p``.

    Args:
        shape: The mask's shape.
        p: The drop probability, in ``(0, 1)``.
        generator: The CPU generator to draw from; torch's default one when ``None``.
    """
    if not 0 < p < 1:
        raise ValueError(f"p={p!r} should be in (0, 1); p=0 keeps every element and p=1 drops all.")
    n = math.prod(shape)
    # random_(int64 min, None) fills the full 64-bit range: 8 uniform bytes per number.
    words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(_MIN_INT64, None, generator=generator)
    draws = words.view(torch.uint8)[:n]
    scaled = p * 256.0  # exact: a power of two
    below = math.floor(scaled)
    drop = draws < below
    ties = _positions(draws == below)
    if ties.numel():
        uniform = torch.rand(ties.numel(), dtype=torch.float64, generator=generator)
        drop[ties[uniform < scaled - below]] = True
    return drop.logical_not_().view(shape)


def _positions(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the ``True`` elements of a flat bool tensor where few are set (ties: 1 in 256)."""
    whole = flags.numel() // 8 * 8
    # Scan 8 flags at a time as one int64, then look inside the few words that have any set.
    words = flags[:whole].view(torch.int64).nonzero().squeeze(1)
    inside = words.unsqueeze(1) * 8 + torch.arange(8)
    found = inside.reshape(-1)[flags[inside.reshape(-1)]]
    tail = flags[whole:].nonzero().squeeze(1) + whole
    return torch.cat([found, tail]) if tail.numel() else found


def dropout(x: torch.Tensor, p: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with elements dropped by ``keep`` (drawn if ``None``) and the rest scaled by ``1 / (1 - p)``.

    The scaling is torch's: the mask is divided by ``1 - p`` in ``x``'s dtype, then multiplied in.
    """
    if keep is None:
        keep = keep_mask(x.shape, p)
    return x * keep.to(x.dtype).div_(1 - p)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor whose size is a multiple of 8 as one bit per element (uint8)."""
    words = mask.reshape(-1).view(torch.uint8).view(torch.int64)
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size, table: torch.Tensor = _BYTE_BITS) -> torch.Tensor:
    """The bool tensor :func:`pack_mask` packed, or its elements mapped through ``table``'s rows.

    One gather from a 256-row table (byte -> its 8 elements) instead of and/compare/convert passes
    over the mask.
    """
    return table.index_select(0, packed.int()).reshape(shape)


def dropout_table(p: float, dtype: torch.dtype) -> torch.Tensor:
    """``unpack_mask`` table giving what torch's dropout multiplies by: 0, or 1 / (1 - p) rounded as it rounds it."""
    table = _DROPOUT_TABLES.get((p, dtype))
    if table is None:
        # The same op on the same dtype as dropout's ``noise.div_(1 - p)``, hence the same bits.
        table = _DROPOUT_TABLES[(p, dtype)] = _BYTE_BITS.to(dtype).div_(1 - p)
    return table
