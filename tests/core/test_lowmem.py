"""Quantizing while loading: the same model as load-then-quantize, with a lower host-memory peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lightning_qlora.core.lowmem import iter_safetensors, load_quantized
from lightning_qlora.core.quantize import QuantConfig, quantize_model
from lightning_qlora.io.models import load_model
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
    # transformers' init: N(0, initializer_range), 0.3 in the tiny config; over 192 draws the sample
    # std is within ~5% of it (one sd), and an all-zero or unit-normal head is far outside 20%.
    assert float(model.score.weight.std()) == pytest.approx(tiny_llama_config().initializer_range, rel=0.2)


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


def test_tied_heads_are_decided_as_from_pretrained_decides(tmp_path):
    from safetensors.torch import save_file

    path = _save(tmp_path, tie_word_embeddings=True)  # save_pretrained writes the tied head once
    low, _ = load_quantized(path)
    assert low.lm_head.weight is low.model.embed_tokens.weight
    # A file whose config ties but which holds a head of its own: transformers keeps that head.
    from transformers import LlamaForCausalLM

    tensors = {k: v.contiguous() for k, v in LlamaForCausalLM.from_pretrained(path).state_dict().items()}
    own_head = torch.randn_like(tensors["model.embed_tokens.weight"])
    tensors["lm_head.weight"] = own_head
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    low, _ = load_quantized(path)
    std = load_model(path)
    quantize_model(std, QuantConfig())
    assert torch.equal(std.lm_head.weight, own_head)  # what from_pretrained makes of it
    assert torch.equal(low.lm_head.weight, own_head) and low.lm_head.weight is not low.model.embed_tokens.weight
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(low(input_ids=ids).logits, std(input_ids=ids).logits, rtol=0, atol=0)


def test_a_header_whose_sizes_disagree_is_an_error(tmp_path):
    import struct

    from safetensors.torch import save_file

    shard = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, shard)
    raw = shard.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert [t.tolist() for _, t in iter_safetensors(shard)] == [[[0, 1, 2], [3, 4, 5]]]
    header["w"]["shape"] = [2, 4]  # 32 bytes of float32 claimed, 24 stored
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    shard.write_bytes(raw[:8] + text + raw[8 + size :])
    with pytest.raises(ValueError, match=r"tensor 'w' has 24 bytes for shape \[2, 4\]; re-save the model"):
        list(iter_safetensors(shard))


PEAK = """
import json, sys, torch
from lightning_qlora.core.lowmem import load_quantized
from lightning_qlora.io.models import load_model
from lightning_qlora.core.quantize import quantize_model

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

def load(path):
    return load_quantized(path) if sys.argv[2] == "low" else quantize_model(load_model(path))

# Load a tiny model first: the lazy imports (transformers' model classes, bitsandbytes' kernels)
# take ~200 MiB on their own and would otherwise count toward both peaks.
load(sys.argv[3])
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
load(sys.argv[1])
print(json.dumps(status("VmHWM") - base))
"""


def test_peak_host_memory_is_lower(tmp_path):
    # 8 layers at width 512: 33.6M quantized weights (134 MiB in fp32), 4.1M in embeddings and head.
    warm = _save(tmp_path / "tiny")
    path = _save(
        tmp_path / "big",
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4000,
    )
    peak = {}
    for mode in ("std", "low"):
        argv = [sys.executable, "-c", PEAK, str(path), mode, str(warm)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        peak[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    # Load-then-quantize holds all fp32 weights (~150 MiB); quantizing while loading holds
    # the 4-bit layers (~18 MiB), the fp32 embeddings and head (~16 MiB) and one tensor: measured
    # 164 against 58 MiB (0.36). Half is the bound: holding all fp32 weights at once exceeds it.
    assert peak["std"] > 140 and peak["low"] < 0.5 * peak["std"], peak


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
    import lightning_qlora.core.lowmem as lowmem
    from lightning_qlora import QLoRAPlugin

    path = _save(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the precision budget measures fp32 weights; auto must not quantize while loading")

    monkeypatch.setattr(lowmem, "load_quantized", refuse)
    plugin = QLoRAPlugin(keep_high_precision=0.05)
    _fit_one_step(path, plugin)
    assert plugin.budget_plans  # planned on the fp32 weights


def test_16_bit_compute_loads_the_budget_model_in_the_checkpoint_dtype(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from lightning_qlora import AdapterConfig, QLoRAPlugin
    from lightning_qlora.tasks import SequenceClassificationModule
    from tests.conftest import counting_batches, loader, quiet_trainer

    path = _save(tmp_path, torch.bfloat16)
    loaded = {}
    original = AutoModelForSequenceClassification.from_pretrained

    def spy(*args, **kwargs):
        loaded["dtype"] = kwargs["dtype"]
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", spy)
    adapters = AdapterConfig(modules_to_save=("score",))
    plugin = QLoRAPlugin(compute_dtype="bf16", keep_high_precision=0.05, adapters=adapters)
    module = SequenceClassificationModule(str(path), num_labels=3, warmup_steps=0)
    batches = [{**b, "labels": b["input_ids"][:, 0] % 3} for b in counting_batches(1)]
    quiet_trainer(plugins=[plugin], max_steps=1).fit(module, loader(batches))
    assert loaded["dtype"] == "auto" and plugin.budget_plans
    # The new head is trained fully: fp32, as after an fp32 load, not the checkpoint's bf16.
    trainable = {n: p.dtype for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and set(trainable.values()) == {torch.float32}


def test_low_memory_value_is_checked():
    from lightning_qlora import CausalLMModule

    with pytest.raises(ValueError, match=r"low_memory='yes' should be True, False or 'auto'"):
        CausalLMModule("unused", low_memory="yes")


@pytest.mark.parametrize("low_memory", [True, False], ids=["low-memory", "fp32"])
def test_loads_on_the_host_under_a_device_context(tmp_path, low_memory):
    # Lightning runs configure_model under `with torch.device(root_device)`; "meta" stands in for
    # the accelerator: nothing may land there, however the model is loaded.
    path = _save(tmp_path, torch.bfloat16)
    kwargs = {"low_memory": True, "quant_config": QuantConfig()} if low_memory else {}
    with torch.device("meta"):
        model = load_model(path, **kwargs)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert {name for name, t in tensors.items() if t.device.type != "cpu"} == set()
    assert model.is_loaded_in_4bit if low_memory else model.model.embed_tokens.weight.dtype == torch.float32


def test_checkpoint_dtype_load_keeps_the_quantized_layers_16_bit_and_the_rest_fp32(tmp_path):
    path = _save(tmp_path, torch.bfloat16)
    half = load_model(path, dtype="auto", quant_config=QuantConfig())
    full = load_model(path)
    dtypes = {name: p.dtype for name, p in half.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    rest = {n: d for n, d in dtypes.items() if not n.endswith("proj.weight")}
    assert set(rest.values()) == {torch.float32} and "lm_head.weight" in rest  # embeddings, norms, head
    quantize_model(half, QuantConfig())
    quantize_model(full, QuantConfig())
    a, b = half.model.layers[1].mlp.down_proj.weight, full.model.layers[1].mlp.down_proj.weight
    assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)


def _module_args(path, plugin, low_memory="auto"):
    from types import SimpleNamespace

    from lightning_qlora.io.models import low_memory_args

    trainer = SimpleNamespace(precision_plugin=plugin, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module = SimpleNamespace(hparams={"low_memory": low_memory}, trainer=trainer, _model_name=str(path))
    return low_memory_args(module)


def test_fp32_loads_use_the_checkpoint_dtype_only_for_16_bit_compute(tmp_path):
    from lightning_qlora import QLoRAPlugin

    path = _save(tmp_path, torch.bfloat16)
    assert _module_args(path, QLoRAPlugin(keep_high_precision=0.05)) == {}  # fp32 compute: fp32, as before
    plugin = QLoRAPlugin(compute_dtype="bf16", keep_high_precision=0.05)
    assert _module_args(path, plugin) == {"dtype": "auto", "quant_config": plugin.quant_config}
    assert _module_args(path, plugin, low_memory=False)["dtype"] == "auto"
    assert _module_args(path, QLoRAPlugin(compute_dtype="bf16"))["low_memory"] is True
    # The calibration forward of the budget needs one dtype throughout: fp32, as before.
    calibrated = QLoRAPlugin(compute_dtype="bf16", keep_high_precision=0.05, calibration=torch.arange(16)[None])
    assert _module_args(path, calibrated) == {}
