"""``prepare``: QLoRA in one call, without Lightning."""

import copy

import bitsandbytes as bnb
import torch

from lightning_qlora import prepare
from tests.conftest import counting_batches


def _layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_auto_compute_dtype_follows_the_device_the_layers_run_on(tiny_llama):
    prepare(tiny_llama, r=4, verbose=False)
    layers = _layers(tiny_llama)
    assert len(layers) == 14 and {layer.compute_dtype for layer in layers} == {torch.float32}
    # As a model prepared on CPU and then moved to a GPU would be: its layers resolved for another
    # device. The next forward resolves "auto" again where the layers now are.
    for layer in layers:
        layer.compute_dtype, layer._compute_device = torch.bfloat16, "cuda"
    batch = counting_batches(1, batch_size=2)[0]
    tiny_llama(input_ids=batch["input_ids"]).logits.sum().backward()
    assert {layer.compute_dtype for layer in layers} == {torch.float32}
    copy.deepcopy(tiny_llama)  # the hook does not stop a copy


def test_an_explicit_compute_dtype_is_kept(tiny_llama):
    prepare(tiny_llama, r=4, compute_dtype="bf16", verbose=False)
    layers = _layers(tiny_llama)
    batch = counting_batches(1, batch_size=2)[0]
    tiny_llama(input_ids=batch["input_ids"]).logits.sum().backward()  # a whole step: no dropout mask left pending
    assert {layer.compute_dtype for layer in layers} == {torch.bfloat16}
