"""Loading models: the embedded default (slow: real weights) and hub ids through the hub cache."""

import hashlib
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_qlora import CausalLMModule, QLoRAPlugin, load_model, load_tokenizer
from lightning_qlora.core.quantize import QuantConfig, quantize_model
from lightning_qlora.io.models import default_model_dir, low_memory_args, resolve_model_path
from tests.conftest import LossRecorder, quiet_trainer, tiny_llama_config


@pytest.mark.slow
def test_default_model_is_cached_as_safetensors():
    path = default_model_dir()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_path("smollm2-135m-instruct") == str(path)


@pytest.mark.slow
def test_default_model_trains_two_steps_through_the_plugin():
    tokenizer = load_tokenizer()
    model = load_model()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    text = ["The capital of France is Paris.", "Water boils at 100 degrees Celsius at sea level."]
    enc = tokenizer(text, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    plugin, recorder = QLoRAPlugin(), LossRecorder()
    L.seed_everything(0)
    trainer = quiet_trainer(plugins=[plugin], callbacks=[recorder], max_steps=2)
    trainer.fit(CausalLMModule(model, warmup_steps=0), DataLoader([batch, batch], batch_size=None))
    report = plugin.quant_reports["model"]
    # 30 layers x (q 576x576, k/v 192x576, o 576x576, gate/up/down 1536x576) = 106,168,320 weights.
    assert len(report.quantized) == 210
    assert report.bytes_before == 106_168_320 * 4
    assert report.ratio <= 0.3
    assert report.ratio == pytest.approx(0.1296, abs=0.001)  # ~4.15 bits/weight incl. constants, over 32
    assert len(recorder.losses) == 2 and all(torch.isfinite(torch.tensor(recorder.losses)))
    # A pretrained model knows these sentences: loss far below ln(49152) = 10.8.
    assert recorder.losses[0] < 5.0


def _hub_repo(cache, repo, model=None, shard="40KB"):
    """Lay ``model`` out as the hub cache does: models--owner--name/{refs/main, snapshots/<commit>/}."""
    from transformers import LlamaForCausalLM

    if model is None:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
    store = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = store / "snapshots" / commit
    model.save_pretrained(snapshot, max_shard_size=shard)
    (store / "refs").mkdir()
    (store / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline. huggingface_hub reads both settings at import, so patch its copies."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _module(name, plugin, low_memory="auto"):
    from types import SimpleNamespace

    trainer = SimpleNamespace(precision_plugin=plugin, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    return SimpleNamespace(hparams={"low_memory": low_memory}, trainer=trainer, _model_name=name)


def test_hub_id_quantizes_while_loading_from_the_cache(offline_hub):
    from lightning_qlora import QLoRAPlugin

    snapshot = _hub_repo(offline_hub, "owner/name")
    assert len(list(snapshot.glob("model-*-of-*.safetensors"))) > 1
    args = low_memory_args(_module("owner/name", QLoRAPlugin()))
    assert args["low_memory"] is True
    hub = load_model("owner/name", **args)
    local = load_model(snapshot, low_memory=True, quant_config=QuantConfig())
    std = load_model(snapshot)
    quantize_model(std, QuantConfig())
    for model in (local, std):
        a, b = hub.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
        torch.testing.assert_close(hub.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_hub_id_without_safetensors_loads_by_id(offline_hub):
    from transformers import LlamaForCausalLM

    from lightning_qlora import QLoRAPlugin

    snapshot = _hub_repo(offline_hub, "owner/bin")
    model = LlamaForCausalLM.from_pretrained(snapshot)
    for file in snapshot.glob("model*.safetensors*"):
        file.unlink()
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    assert low_memory_args(_module("owner/bin", QLoRAPlugin())) == {}  # fp32 compute: as before
    loaded = load_model("owner/bin")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="low-memory loading reads safetensors shards, and 'owner/bin' has none"):
        load_model("owner/bin", low_memory=True, quant_config=QuantConfig())


def test_hub_id_missing_offline_is_a_one_line_error(offline_hub):
    from lightning_qlora import QLoRAPlugin

    with pytest.raises(OSError, match=r"'owner/absent' is not in the hub cache .* HF_HUB_OFFLINE=1") as err:
        low_memory_args(_module("owner/absent", QLoRAPlugin()))
    assert "\n" not in str(err.value)
    _hub_repo(offline_hub, "owner/partial")
    next((offline_hub / "models--owner--partial" / "snapshots").glob("*/model-00002-*")).unlink()
    with pytest.raises(OSError, match=r"lacks model-00002-of-\d{5}.safetensors, which its index names") as err:
        load_model("owner/partial", low_memory=True, quant_config=QuantConfig())
    assert "\n" not in str(err.value)


PEAK = """
import json, sys
import bitsandbytes, transformers.models.llama.modeling_llama  # imported before the baseline
from lightning_qlora.io.models import load_model
from lightning_qlora.core.quantize import QuantConfig

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

before = status("VmRSS")
# Reset the peak (VmHWM) to now. Not ru_maxrss: it keeps the forked parent's RSS across exec.
open("/proc/self/clear_refs", "w").write("5")
model = load_model(sys.argv[1], low_memory=True, quant_config=QuantConfig())
quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
print(json.dumps({"increase": status("VmHWM") - before, "quantized": quantized}))
"""


def test_hub_id_load_peak_memory_stays_below_the_fp32_model(offline_hub):
    from transformers import LlamaForCausalLM

    # 12 layers at width 768: 113M quantized weights, 12.6M in embeddings and head; bf16, 3 shards.
    shape = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = tiny_llama_config(**shape, num_key_value_heads=12, vocab_size=8192, initializer_range=0.02)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    _hub_repo(offline_hub, "owner/big", model, shard="100MB")
    del model
    env = {**os.environ, "HF_HUB_CACHE": str(offline_hub), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PEAK, "owner/big"], capture_output=True, text=True, env=env, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["quantized"] == 84
    # Quantizing while loading holds the 4-bit layers (~60 MB), the fp32 embeddings and head
    # (~50 MB) and one tensor; from_pretrained in fp32 would hold all 503 MB.
    assert result["increase"] < 0.5 * fp32_bytes, (result, fp32_bytes)
