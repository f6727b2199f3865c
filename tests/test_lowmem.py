"""Quantizing while loading: the same model as load-then-quantize, with a lower host-memory peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lightning_qlora.lowmem import iter_safetensors, load_quantized
from lightning_qlora.models import load_model
from lightning_qlora.quantize import QuantConfig, quantize_model
from tests.conftest import tiny_llama_config


def _save(tmp_path, dtype=torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_packed_weights_and_logits_as_load_then_quantize(tmp_path, dtype):
    path = _save(tmp_path, dtype)
    low, report = load_quantized(path)
    std = load_model(path)
    quantize_model(std, QuantConfig())
    assert len(report.quantized) == 14 and report.bytes_after == 53_360  # as pinned in test_quantize
    a = low.model.layers[1].mlp.down_proj.weight
    b = std.model.layers[1].mlp.down_proj.weight
    assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(low(input_ids=ids).logits, std(input_ids=ids).logits, rtol=0, atol=0)
    assert low.is_loaded_in_4bit  # so PEFT dispatches its bnb-aware LoRA layers


def test_new_classification_head_is_initialized_not_left_on_meta(tmp_path):
    path = _save(tmp_path)
    model, _ = load_quantized(path, task="sequence-classification", num_labels=3)
    assert not model.score.weight.is_meta and model.score.weight.shape == (3, 64)
    assert float(model.score.weight.std()) > 0


def test_missing_and_truncated_weights_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _save(tmp_path)
    shard = path / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no weights for 1 parameters \(e.g. 'model.layers.0.input_layernorm"):
        load_quantized(path)
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="is truncated at tensor"):
        list(iter_safetensors(shard))


PEAK = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from lightning_qlora.lowmem import load_quantized
from lightning_qlora.models import load_model
from lightning_qlora.quantize import quantize_model

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now: imports don't count
if sys.argv[2] == "low":
    load_quantized(sys.argv[1])
else:
    quantize_model(load_model(sys.argv[1]))
print(json.dumps(status("VmHWM") - base))
"""


def test_peak_host_memory_is_lower(tmp_path):
    # 8 layers at width 512: 33.6M quantized weights (134 MiB in fp32), 4.1M in embeddings and head.
    path = _save(
        tmp_path,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4000,
    )
    peak = {}
    for mode in ("std", "low"):
        done = subprocess.run([sys.executable, "-c", PEAK, str(path), mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        peak[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    # Load-then-quantize holds all fp32 weights (~150 MiB); quantizing while loading holds
    # the 4-bit layers (~18 MiB), the fp32 embeddings and head (~16 MiB) and one tensor.
    assert peak["std"] > 140 and peak["low"] < 0.7 * peak["std"], peak


def _fit_one_step(path, plugin, low_memory="auto"):
    from lightning_qlora import CausalLMModule
    from tests.conftest import counting_batches, loader, quiet_trainer

    module = CausalLMModule(str(path), warmup_steps=0, low_memory=low_memory)
    quiet_trainer(plugins=[plugin], max_steps=1).fit(module, loader(counting_batches(1)))
    return module


def test_auto_low_memory_quantizes_while_loading_and_keeps_the_reports(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lightning_qlora import QLoRAPlugin

    path = _save(tmp_path)
    reference = QLoRAPlugin()
    _fit_one_step(path, reference, low_memory=False)  # load, then quantize

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained loads the whole fp32 model; auto should have read it tensor by tensor")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    plugin = QLoRAPlugin()
    _fit_one_step(path, plugin)
    (label,) = plugin.quant_reports
    report, ref = plugin.quant_reports[label], reference.quant_reports[label]
    assert len(report.quantized) == 14 and report.bytes_after == 53_360  # as pinned in test_quantize
    assert (report.quantized, report.bytes_before, report.already_quantized) == (ref.quantized, ref.bytes_before, [])
    errors = {e.name: e.weight_rel_error for e in plugin.quant_errors[label]}
    assert errors == {e.name: e.weight_rel_error for e in reference.quant_errors[label]}


def test_auto_low_memory_loads_fp32_when_the_budget_needs_it(tmp_path, monkeypatch):
    import lightning_qlora.lowmem as lowmem
    from lightning_qlora import QLoRAPlugin

    path = _save(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the precision budget measures fp32 weights; auto must not quantize while loading")

    monkeypatch.setattr(lowmem, "load_quantized", refuse)
    plugin = QLoRAPlugin(keep_high_precision=0.05)
    _fit_one_step(path, plugin)
    assert plugin.budget_plans  # planned on the fp32 weights


def test_low_memory_value_is_checked():
    from lightning_qlora import CausalLMModule

    with pytest.raises(ValueError, match=r"low_memory='yes' should be True, False or 'auto'"):
        CausalLMModule("unused", low_memory="yes")
