"""Reusing work in the checkpoint recompute: fewer dequantizations and mask draws, the same bits."""

import copy
import pickle

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_qlora import CPUOptions, prepare
from lightning_qlora.cpu.dropout import dropout_table, pack_mask, unpack_mask
from lightning_qlora.cpu.recompute import ReplayDropout, _pending, reuse_recomputation
from tests.conftest import VOCAB, CountOps, tiny_llama_config


def test_mask_packing_round_trips_every_byte():
    every_byte = torch.tensor([[(b >> j) & 1 for j in range(8)] for b in range(256)], dtype=torch.bool)
    packed = pack_mask(every_byte)
    assert packed.dtype == torch.uint8 and packed.numel() == 256
    assert torch.equal(unpack_mask(packed, every_byte.shape), every_byte)
    mask = torch.rand(3, 5, 24) < 0.3
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.7])
def test_replayed_mask_values_are_torchs_dropout_bits(p, dtype):
    # Torch's CPU dropout: noise = bernoulli(1 - p), noise /= (1 - p), x * noise. The replay
    # looks the scaled values up in a table instead, and must give the same bits.
    torch.manual_seed(0)
    x = torch.randn(4, 7, 40).to(dtype)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    packed = pack_mask(noise.bool())
    expected = x * noise.div_(1 - p)
    got = x * unpack_mask(packed, x.shape, dropout_table(p, dtype))
    assert got.dtype == dtype
    assert torch.equal(got, expected)


class Block(nn.Module):
    """Linear → dropout → another random op: replaying must leave the later op's draw unchanged."""

    def __init__(self, dropout: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.dropout = dropout

    def forward(self, x):
        h = self.dropout(self.linear(x))
        return nn.functional.dropout(h.tanh(), 0.3, training=self.training)


def _run_block(dropout: nn.Module, preserve_rng_state: bool = True):
    torch.manual_seed(0)
    block = Block(dropout)
    x = torch.randn(4, 6, 16, requires_grad=True)
    torch.manual_seed(1)
    with CountOps("bernoulli_") as count:
        out = checkpoint(block, x, use_reentrant=False, preserve_rng_state=preserve_rng_state)
        out.square().sum().backward()
    assert not _pending.entries  # replayed, or dropped at the end of the backward
    return out.detach(), x.grad, block.linear.weight.grad, torch.get_rng_state(), count.counts["bernoulli_"]


def test_replayed_dropout_equals_redrawn_dropout_bit_for_bit():
    out, grad_x, grad_w, rng, draws = _run_block(nn.Dropout(0.25))
    out2, grad_x2, grad_w2, rng2, draws2 = _run_block(ReplayDropout(0.25))
    assert torch.equal(out, out2) and torch.equal(grad_x, grad_x2) and torch.equal(grad_w, grad_w2)
    assert torch.equal(rng, rng2)  # the RNG stream after the step is the stock one
    # Stock: 2 draws in the forward, 2 again in the recompute. Replay: the dropout's recompute draw is gone.
    assert (draws, draws2) == (4, 3)


def test_no_replay_when_the_recompute_sees_another_rng_state():
    # Without preserve_rng_state the recompute draws a different mask; replaying would hide that.
    out, grad_x, _, _, draws = _run_block(nn.Dropout(0.25), preserve_rng_state=False)
    out2, grad_x2, _, _, draws2 = _run_block(ReplayDropout(0.25), preserve_rng_state=False)
    assert torch.equal(out, out2) and torch.equal(grad_x, grad_x2)
    assert draws == draws2 == 4


def test_replay_dropout_outside_checkpointing_is_plain_dropout():
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    expected = nn.functional.dropout(x, 0.1)
    drop = ReplayDropout(0.1)
    torch.manual_seed(3)
    assert torch.equal(drop(x), expected)
    assert not _pending.entries  # nothing kept when no recompute will come
    assert torch.equal(drop.eval()(x), x)


def _fit(
    model_factory, swap: bool, gradient_checkpointing: bool, steps: int = 3, fast: bool = False, reentrant: bool = False
):
    from lightning_qlora.cpu.recompute import checkpoint_reentrant

    torch.manual_seed(0)
    model = model_factory()
    kw = dict(r=4, alpha=8, dropout=0.1, gradient_checkpointing=gradient_checkpointing, verbose=False)
    prepare(model, **kw, cpu=CPUOptions(reuse_recompute=swap, fast_dropout=fast, reentrant_checkpoint=reentrant))
    swapped = [m for m in model.modules() if type(m).__name__ in ("ReuseLinear4bit", "ReplayDropout")]
    assert len(swapped) == (28 if swap else 0)  # 2 layers x 7 projections, each with its LoRA dropout
    funcs = [getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()]
    engaged = sum(getattr(f, "func", None) is checkpoint_reentrant for f in funcs)
    assert engaged == (2 if reentrant and gradient_checkpointing else 0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    # bnb's stock forward dequantizes inside its gemm_4bit op, where the mode cannot see: count both.
    with CountOps("gemm_4bit", "dequantize_4bit", "dequantize_blockwise", "bernoulli_", "random_") as count:
        for _ in range(steps):
            ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    counts = count.counts
    counts = {
        "dequantize": counts["gemm_4bit"] + counts["dequantize_4bit"],
        "bernoulli_": counts["bernoulli_"],
        "random_": counts["random_"],  # fast masks' draws
        "scales": counts["dequantize_blockwise"],  # double quant's block scales
    }
    return losses, [p.detach().clone() for p in trainable], torch.get_rng_state(), counts


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_reuse_changes_no_bit_of_training(gradient_checkpointing, reentrant):
    from transformers import LlamaForCausalLM

    def factory():
        return LlamaForCausalLM(tiny_llama_config())

    # The reference is stock layers under transformers' non-reentrant checkpointing.
    stock = _fit(factory, swap=False, gradient_checkpointing=gradient_checkpointing)
    reused = _fit(factory, swap=True, gradient_checkpointing=gradient_checkpointing, reentrant=reentrant)
    assert stock[0] == reused[0]  # losses, exactly
    assert all(torch.equal(a, b) for a, b in zip(stock[1], reused[1], strict=True))  # adapter weights after 3 steps
    assert torch.equal(stock[2], reused[2])  # RNG state after training
    layers, steps = 14, 3
    if gradient_checkpointing:
        # Stock: forward + recompute + backward. Reused: the backward takes the recompute's.
        assert stock[3] == {
            "dequantize": 3 * layers * steps,
            "bernoulli_": 2 * layers * steps,
            "random_": 0,
            "scales": layers * steps,
        }
        # ...and the block scales were dequantized once, when the layers were swapped.
        assert reused[3] == {"dequantize": 2 * layers * steps, "bernoulli_": layers * steps, "random_": 0, "scales": 0}
    else:
        # Forward, then backward for all but layer 0's q, k, v: their input (the frozen embedding) needs no grad.
        expected = {"dequantize": (2 * layers - 3) * steps, "bernoulli_": layers * steps, "random_": 0}
        # (Stock's forward dequantizes inside gemm_4bit; the scales counted are its backward's.)
        assert stock[3] == {**expected, "scales": (layers - 3) * steps}
        assert reused[3] == {**expected, "scales": 0}


def test_fast_masks_are_replayed_bit_for_bit(monkeypatch):
    # Fast masks come from another stream than torch's, so the reference is the same fast masks
    # drawn again in every recompute (none found kept), as stock checkpointing would.
    from transformers import LlamaForCausalLM

    def factory():
        return LlamaForCausalLM(tiny_llama_config())

    replayed = _fit(factory, swap=True, gradient_checkpointing=True, fast=True, reentrant=True)
    monkeypatch.setattr(_pending, "take", lambda key, state: None)
    redrawn = _fit(factory, swap=True, gradient_checkpointing=True, fast=True)
    assert replayed[0] == redrawn[0]
    assert all(torch.equal(a, b) for a, b in zip(replayed[1], redrawn[1], strict=True))
    assert torch.equal(replayed[2], redrawn[2])
    layers, steps = 14, 3
    draws = {"dequantize": 2 * layers * steps, "bernoulli_": 0, "scales": 0}
    assert replayed[3] == {**draws, "random_": layers * steps}
    assert redrawn[3] == {**draws, "random_": 2 * layers * steps}
    stock = _fit(factory, swap=False, gradient_checkpointing=True)
    assert stock[0][0] == replayed[0][0]  # LoRA B starts at 0: the first loss cannot see the masks
    assert stock[0][1:] != replayed[0][1:]  # later ones do: another stream


def test_swapped_layers_still_are_bnb_layers_and_pickle(tiny_llama):
    stock = prepare(tiny_llama, r=4, cpu=CPUOptions(reuse_recompute=False), verbose=False)
    assert reuse_recomputation(stock) == (14, 14)
    q = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and type(q.base_layer).__name__ == "ReuseLinear4bit"
    assert isinstance(q.lora_dropout["default"], nn.Dropout)
    x = torch.randn(2, 3, 64)
    clone = pickle.loads(pickle.dumps(tiny_llama.model.layers[0]))
    torch.testing.assert_close(clone.self_attn.q_proj.eval()(x), q.eval()(x), rtol=0, atol=0)
    assert type(copy.deepcopy(q).base_layer) is type(q.base_layer)
    assert reuse_recomputation(tiny_llama) == (0, 0)  # a second call finds nothing left to swap


def test_two_forwards_before_one_backward_replay_the_right_masks():
    # Gradient accumulation done as one backward of a summed loss: two recomputes, in either order.
    def run(dropout):
        torch.manual_seed(0)
        block = Block(dropout)
        xs = [torch.randn(2, 3, 16, requires_grad=True) for _ in range(2)]
        torch.manual_seed(1)
        outs = [checkpoint(block, x, use_reentrant=False) for x in xs]
        sum(o.square().sum() for o in outs).backward()
        return [x.grad for x in xs], block.linear.weight.grad

    (grads, grad_w), (grads2, grad_w2) = run(nn.Dropout(0.5)), run(ReplayDropout(0.5))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True)) and torch.equal(grad_w, grad_w2)


def test_abandoned_and_oversized_masks_fall_back_to_drawing(monkeypatch):
    def run(dropout, abandon):
        torch.manual_seed(0)
        block = Block(dropout)
        x = torch.randn(2, 3, 16, requires_grad=True)
        torch.manual_seed(1)
        if abandon:  # a forward whose backward never comes
            checkpoint(block, torch.randn(2, 3, 16, requires_grad=True), use_reentrant=False)
        checkpoint(block, x, use_reentrant=False).square().sum().backward()
        assert not _pending.entries  # whatever was not replayed is gone after the backward
        return x.grad

    assert torch.equal(run(nn.Dropout(0.5), True), run(ReplayDropout(0.5), True))
    monkeypatch.setattr("lightning_qlora.cpu.recompute.MAX_KEPT_BYTES", 0)  # nothing fits: every recompute draws
    assert torch.equal(run(nn.Dropout(0.5), False), run(ReplayDropout(0.5), False))
