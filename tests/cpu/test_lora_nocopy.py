"""PEFT's 4-bit LoRA layer without the defensive copy: the same bits, one copy fewer."""

import pickle

import torch
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

from lightning_qlora import CPUOptions, prepare
from lightning_qlora.cpu.lora_nocopy import lora_linear4bit
from tests.conftest import CountOps


def _forward_backward(layer, x):
    x = x.clone().requires_grad_(True)
    with CountOps("clone") as count:
        out = layer(x)
        out.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads, count.counts["clone"]


def test_same_output_and_gradients_without_the_copy(tiny_llama):
    prepare(tiny_llama, r=4, dropout=0.0, cpu=CPUOptions(reuse_recompute=False), verbose=False)
    layer = tiny_llama.model.layers[0].mlp.up_proj
    assert type(layer) is PeftLinear4bit
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # a LoRA term that is not zero
    x = torch.randn(2, 5, 64)
    stock = _forward_backward(layer, x)
    layer.__class__ = lora_linear4bit()
    ours = _forward_backward(layer, x)
    assert torch.equal(stock[0], ours[0]) and torch.equal(stock[1], ours[1])
    assert all(torch.equal(a, b) for a, b in zip(stock[2], ours[2], strict=True))
    assert (stock[3], ours[3]) == (1, 0)  # PEFT's defensive clone is gone

    layer.enable_adapters(False)  # disabled adapters: PEFT's own path, the base layer alone
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
    clone = pickle.loads(pickle.dumps(layer))
    assert type(clone).__name__ == "LoRALinear4bit"


def test_reuse_recomputation_swaps_every_lora_layer(tiny_llama):
    prepare(tiny_llama, r=4, verbose=False)
    kinds = [type(m).__name__ for m in tiny_llama.modules() if isinstance(m, PeftLinear4bit)]
    assert kinds == ["LoRALinear4bit"] * 14
