"""Chunked cross-entropy: the plain path's loss and gradients, without the full logits."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_qlora import CausalLMModule
from lightning_qlora.core.adapters import AdapterConfig, add_adapters
from lightning_qlora.core.quantize import QuantConfig, quantize_model
from tests.conftest import counting_batches, tiny_llama_config

# Wider than the hidden size (64), so that only the head's matmuls are this wide.
VOCAB = 96


def _module(chunk: int | None, quantized: bool, wrapped: bool = False) -> CausalLMModule:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB))
    if quantized:
        quantize_model(model, QuantConfig())
    peft_model, _ = add_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; non-zero B makes every LoRA gradient count
            param.data.normal_(0, 0.05)
    # QLoRAPlugin keeps the model PEFT injected into (its forward takes logits_to_keep); the
    # PeftModel wrapper's forward does not, so the head meets every position.
    return CausalLMModule(peft_model if wrapped else model, loss_chunk_size=chunk)


def _batch() -> dict[str, torch.Tensor]:
    (batch,) = counting_batches(1, batch_size=3)
    batch["labels"][:, :5] = -100  # a prompt: unscored positions
    batch["labels"][1, 9:] = -100  # and a shorter answer in one row
    return batch


class HeadOutputs(TorchDispatchMode):
    """The row counts of every matmul output as wide as the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("mm", "addmm", "bmm")) and out.shape[-1] == VOCAB:
            self.rows.append(out.numel() // VOCAB)
        return out


@pytest.mark.parametrize("wrapped", [False, True], ids=["injected", "peft-model"])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_same_loss_and_gradients_as_the_whole_loss(chunk, quantized, wrapped):
    results = []
    for size in (None, chunk):
        module = _module(size, quantized, wrapped)
        nll, count = module._loss_sums(_batch())
        (nll / count).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((nll.detach(), count, grads))
    (whole, n1, g1), (chunked, n2, g2) = results
    # 3 rows x 15 next-token targets, less 4 prompt targets each and 7 more in row 1.
    assert int(n1) == int(n2) == 3 * 11 - 7
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) == 2 * 14
    for name in g1:
        assert g1[name].abs().sum() > 0, name
        # Chunks sum in another order: within 1e-5 of each gradient's largest entry (8e-7 measured).
        assert (g2[name] - g1[name]).abs().max() <= 1e-5 * g1[name].abs().max(), name


def test_the_full_logits_never_exist_forward_or_backward():
    shapes = {}
    for size in (None, 4):
        module = _module(size, quantized=True)
        with HeadOutputs() as seen:
            nll, count = module._loss_sums(_batch())
            (nll / count).backward()
        shapes[size] = seen.rows
    # Whole: the head runs once over the positions scored in any row (15 - 4 = 11 per row, x 3).
    assert shapes[None] == [33]
    # Chunked: the model's own head call gets zero positions; then 26 scored tokens in chunks of 4,
    # each computed once: the backward recomputes nothing.
    assert sorted(shapes[4]) == sorted([0] + [4] * 6 + [2])


def test_bad_chunk_sizes_and_heads_are_refused():
    for bad in (0, -1, 2.5, True, "1024"):
        with pytest.raises(ValueError, match=rf"loss_chunk_size={bad!r}: expected auto"):
            CausalLMModule(_module(None, False).model, loss_chunk_size=bad)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB))
    holder = torch.nn.Sequential(torch.nn.Linear(64, VOCAB, bias=False))
    quantize_model(holder, QuantConfig())
    model.lm_head = holder[0]  # a 4-bit head, as quantizing it would leave
    module = CausalLMModule(model, loss_chunk_size=8)
    with pytest.raises(ValueError, match="needs an unquantized Linear output head, but the model's is Linear4bit"):
        module._loss_sums(_batch())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_a_trained_head_with_bias_gets_the_plain_gradients(dtype, chunk):
    from lightning_qlora.tasks.chunked_loss import chunked_token_nll
    from lightning_qlora.tasks.metrics import token_nll

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=True).to(dtype)
    hidden = torch.randn(2, 9, 16, dtype=dtype)
    target = torch.randint(0, 40, (2, 9))
    target[0, :3] = -100
    results = []
    for fused in (False, True):
        head.zero_grad()
        h = hidden.clone().requires_grad_(True)
        nll, count = chunked_token_nll(h, head, target, chunk) if fused else token_nll(head(h), target)
        (nll / count).backward()
        results.append((nll.detach().float(), int(count), h.grad, head.weight.grad, head.bias.grad))
    (n1, c1, *g1), (n2, c2, *g2) = results
    assert c1 == c2 == 15
    tol = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(n2, n1, **tol)
    for plain, fused in zip(g1, g2, strict=True):
        assert fused.dtype == plain.dtype == dtype and plain.abs().sum() > 0
        torch.testing.assert_close(fused, plain, **tol)


def test_no_scored_token_and_no_grad_mode():
    from lightning_qlora.tasks.chunked_loss import chunked_token_nll

    head = torch.nn.Linear(8, 12, bias=False)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    nll, count = chunked_token_nll(hidden, head, torch.full((1, 4), -100), 2)
    assert float(nll) == 0.0 and int(count) == 0
    nll.backward()
    assert hidden.grad.abs().sum() == 0
    with torch.no_grad():
        nll, count = chunked_token_nll(hidden, head, torch.tensor([[1, 2, -100, 3]]), 2)
    expected = torch.nn.functional.cross_entropy(head(hidden[0, [0, 1, 3]]), torch.tensor([1, 2, 3]), reduction="sum")
    torch.testing.assert_close(nll, expected.detach()) and None
    assert not nll.requires_grad and int(count) == 3


def test_auto_chunks_where_it_can_and_falls_back_to_the_whole_loss_elsewhere():
    from transformers import LlamaForCausalLM

    from lightning_qlora.tasks.chunked_loss import AUTO_CHUNK, resolve_chunk_size
    from lightning_qlora.tasks.metrics import token_nll

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB))
    assert CausalLMModule(model).loss_chunk_size == "auto"  # the default
    assert resolve_chunk_size(model, "auto") == AUTO_CHUNK
    assert resolve_chunk_size(model, "auto", sharded=True) is None  # FSDP: the head's weight is a shard
    assert resolve_chunk_size(model, None) is None and resolve_chunk_size(model, 8) == 8
    holder = torch.nn.Sequential(torch.nn.Linear(64, VOCAB, bias=False))
    quantize_model(holder, QuantConfig())
    model.lm_head = holder[0]
    assert resolve_chunk_size(model, "auto") is None  # a 4-bit head: the whole loss, no error
    module = CausalLMModule(model)
    nll, count = module._loss_sums(_batch())
    logits, target, _ = module._forward_scored(_batch())
    assert int(count) == 26 and torch.equal(nll, token_nll(logits, target)[0])
