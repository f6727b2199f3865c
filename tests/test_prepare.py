"""``prepare``: QLoRA in one call, without Lightning."""

import copy

import bitsandbytes as bnb
import pytest
import torch

from lightning_qlora import CPUOptions, prepare
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


def _kinds(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


def test_cpu_options_choose_the_layers(tiny_llama):
    prepare(tiny_llama, r=4, cpu=CPUOptions(reuse_recompute=False), verbose=False)
    assert not _kinds(tiny_llama) & {"ReuseLinear4bit", "ReplayDropout", "LoRALinear4bit"}


def test_deprecated_reuse_recompute_warns_and_keeps_stock_layers(tiny_llama):
    with pytest.warns(DeprecationWarning, match=r"pass prepare\(cpu=CPUOptions\(reuse_recompute=False\)\) instead"):
        prepare(tiny_llama, r=4, reuse_recompute=False, verbose=False)
    assert not _kinds(tiny_llama) & {"ReuseLinear4bit", "ReplayDropout", "LoRALinear4bit"}


def test_deprecated_fast_dropout_warns_and_draws_torch_masks(tiny_llama):
    with pytest.warns(DeprecationWarning, match=r"prepare\(fast_dropout=\.\.\.\) is deprecated"):
        prepare(tiny_llama, r=4, fast_dropout=False, verbose=False)
    drops = [m for m in tiny_llama.modules() if type(m).__name__ == "ReplayDropout"]
    assert len(drops) == 14 and not any(d.fast_masks for d in drops)


def test_deprecated_keyword_and_cpu_together_are_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"^prepare\(\) got both cpu= and the deprecated fast_dropout=False;"):
        prepare(tiny_llama, cpu=CPUOptions(), fast_dropout=False, verbose=False)
    assert not _kinds(tiny_llama) & {"Linear4bit"}  # refused before anything was quantized
