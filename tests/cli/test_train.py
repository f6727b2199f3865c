"""The real entry point, `python train.py`, on a tiny random model with the default tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from lightning_qlora import load_tokenizer
    from tests.conftest import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=512, initializer_range=0.02)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


def test_medical_recipe_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = _train(
        f"model.name_or_path={tiny_model_dir}",
        "trainer.max_steps=2",
        "data.batch_size=2",
        "max_new_tokens=4",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "logs/metrics.csv", "loss_curve.png", "report.md", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["before"]) == {"val_loss", "val_ppl", "val_token_acc"}
    assert metrics["after"]["val_loss"] != metrics["before"]["val_loss"]
    assert "val_loss" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert needle in result.stderr, result.stderr[-2000:]


def test_missing_data_file(tmp_path):
    result = _train("data.path=/nonexistent/rows.jsonl", f"output_dir={tmp_path / 'o'}")
    _one_line_error(result, "error: Data file '/nonexistent/rows.jsonl' does not exist")


def test_unknown_key_and_unknown_recipe(tmp_path):
    _one_line_error(_train("adapter.rank=4", f"output_dir={tmp_path / 'o'}"), "Key 'rank' is not in struct")
    _one_line_error(_train("recipe=cooking", f"output_dir={tmp_path / 'o'}"), "Could not find 'recipe/cooking'")


def test_earlier_run_is_never_overwritten(tmp_path):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "report.md").write_text("precious")
    _one_line_error(_train(f"output_dir={out}"), "already holds files from an earlier run")
    assert (out / "report.md").read_text() == "precious"
