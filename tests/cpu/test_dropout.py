"""8-bit dropout masks: torch's Bernoulli distribution from another stream, and torch's scaling."""

import math

import pytest
import torch

from lightning_qlora.cpu.dropout import dropout, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.1, 1 / 512, 0.25, 0.5, 0.9, 0.999])
def test_keep_rate_is_one_minus_p(p):
    torch.manual_seed(0)
    n = 2_000_003  # not a multiple of 8: the last, partial word counts too
    drops = n - keep_mask((n,), p).sum().item()
    sd = math.sqrt(n * p * (1 - p))
    # Within 5 standard deviations. Without the tie draw, p=0.05 would drop 12/256 (20 sd short)
    # and p=1/512 nothing at all.
    assert abs(drops - n * p) < 5 * sd, (drops, n * p, sd)


@pytest.mark.parametrize("offset", [1, 7, 8, 64])
def test_elements_are_independent(offset):
    # Neighbours within a random byte's word (1, 7) and the same byte of later words (8, 64).
    torch.manual_seed(1)
    p, n = 0.3, 4_000_000
    drop = ~keep_mask((n,), p)
    both = (drop[:-offset] & drop[offset:]).sum().item()
    pairs = n - offset
    sd = math.sqrt(pairs * p * p * (1 - p * p))
    assert abs(both - pairs * p * p) < 5 * sd


def test_masks_follow_the_seed_and_advance_the_stream():
    torch.manual_seed(7)
    first, second = keep_mask((64, 33), 0.1), keep_mask((64, 33), 0.1)
    torch.manual_seed(7)
    assert torch.equal(keep_mask((64, 33), 0.1), first)
    assert not torch.equal(first, second)
    gen = torch.Generator().manual_seed(7)
    state = torch.get_rng_state()
    assert torch.equal(keep_mask((64, 33), 0.1, generator=gen), first)  # the same stream, from a generator
    assert torch.equal(torch.get_rng_state(), state)  # ...leaving the default one alone
    assert first.shape == (64, 33) and first.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scales_kept_elements_as_torch_does(dtype):
    torch.manual_seed(0)
    x = torch.randn(16, 40).to(dtype)
    expected = torch.nn.functional.dropout(x, 0.3, training=True)
    keep = expected != 0  # x has no zeros, so these are torch's kept elements
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(dropout(x, 0.3, keep), expected)
    out = dropout(x, 0.3)
    assert out.dtype == dtype and torch.equal(out[out != 0], (x * torch.ones((), dtype=dtype).div_(0.7))[out != 0])


@pytest.mark.parametrize("p", [0, 1, -0.1, 1.5])
def test_a_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match=rf"p={p!r} should be in \(0, 1\)"):
        keep_mask((8,), p)
