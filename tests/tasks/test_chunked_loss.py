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
    # each computed in the forward and again in the backward.
    assert sorted(shapes[4]) == sorted([0] + 2 * ([4] * 6 + [2]))


def test_bad_chunk_sizes_and_heads_are_refused():
    for bad in (0, -1, 2.5, True, "1024"):
        with pytest.raises(ValueError, match=rf"loss_chunk_size={bad!r}: expected null"):
            CausalLMModule(_module(None, False).model, loss_chunk_size=bad)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB))
    holder = torch.nn.Sequential(torch.nn.Linear(64, VOCAB, bias=False))
    quantize_model(holder, QuantConfig())
    model.lm_head = holder[0]  # a 4-bit head, as quantizing it would leave
    module = CausalLMModule(model, loss_chunk_size=8)
    with pytest.raises(ValueError, match="needs an unquantized Linear output head, but the model's is Linear4bit"):
        module._loss_sums(_batch())
