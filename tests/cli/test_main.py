"""`lightning-qlora train|merge|generate|evaluate` (= `python -m lightning_qlora`) on a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import cli_command, cli_env, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_qlora", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    # The generative recipe: merge and generate below compare with a plain causal LM's greedy answer.
    overrides = ["recipe=medical", f"model.name_or_path={tiny_model_dir}", "trainer.max_steps=2", "data.batch_size=2"]
    overrides += ["sample_prompts=0", f"output_dir={out}"]
    done = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, env=cli_env(), timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr[-2000:]


def test_evaluate_reproduces_the_runs_test_metrics(run_dir, tmp_path):
    result = _cli("evaluate", "--adapter", str(run_dir / "adapter"), "--output", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((tmp_path / "m.json").read_text())
    during = json.loads((run_dir / "metrics.json").read_text())["test"]
    # A fresh base, quantized as in training, plus the saved adapter scores what the trained module scored.
    assert ours["test_loss"] == pytest.approx(during["test_loss"], abs=1e-3)
    assert ours["test_choice_acc"] == pytest.approx(during["test_choice_acc"])


def test_merge_then_generate_from_merged_and_from_adapter(run_dir, tmp_path):
    merged = tmp_path / "merged"
    result = _cli("merge", "--adapter", str(run_dir / "adapter"), "--output", str(merged))
    assert result.returncode == 0, result.stderr[-3000:]
    card = (merged / "README.md").read_text()
    assert "val_loss" in card and "Training config" in card  # metrics and config from the run
    assert (merged / "tokenizer.json").is_file()
    _one_line_error(_cli("merge", "--adapter", str(run_dir / "adapter"), "--output", str(merged)), "--force")
    _one_line_error(
        _cli("merge", "--adapter", str(run_dir / "adapter"), "--base", str(merged), "--output", str(tmp_path / "m2")),
        "already has an adapter merged",
    )
    for source in (("--base", str(merged)), ("--adapter", str(run_dir / "adapter"))):
        result = _cli("generate", *source, "--prompt", "Is it raining?", "--max-new-tokens", "3")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.startswith(">>> Is it raining?\n") and len(result.stdout.splitlines()) >= 2
        if source[0] == "--base":  # the merged model is plain transformers: its answer, computed here
            assert result.stdout == f">>> Is it raining?\n{_greedy_answer(merged, 'Is it raining?', 3)}\n"


def _greedy_answer(model_dir: Path, prompt: str, new_tokens: int) -> str:
    """Stock transformers' greedy answer, with the chat template, as `generate` should print it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # load_model's dtype
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_bad_input_is_one_line(tmp_path):
    missing = _cli("merge", "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "o"))
    _one_line_error(missing, "does not exist")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    _one_line_error(_cli("evaluate", "--adapter", str(tmp_path / "half")), "lacks adapter_model.safetensors")
    _one_line_error(_cli("generate"), "no prompt given")


def test_help_lists_the_five_subcommands(tmp_path):
    for command in (cli_command(), [sys.executable, "-m", "lightning_qlora"]):
        result = subprocess.run(
            [*command, "--help"], cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "{train,merge,generate,evaluate,estimate}" in result.stdout


def _user_recipe(root: Path) -> Path:
    """A recipe of the user's own, outside the package: news topics from a folder of their rows."""
    conf = root / "my_conf"
    (conf / "recipe").mkdir(parents=True)
    (conf / "recipe" / "mine.yaml").write_text(
        "# @package _global_\n"
        "recipe: {name: mine}\n"
        "data: {task: ag_news, dataset: my/news, path: null, hub_config: null, sample_dir: my_rows,\n"
        "       max_length: 64, batch_size: 2, val_fraction: 0.25, system: null, packing: false}\n"
        "adapter: {modules_to_save: [score]}\n"
    )
    rows = [{"text": f"news item {i} about topic {i % 4}", "label": i % 4} for i in range(12)]
    (root / "my_rows").mkdir()  # train.jsonl only: validation is held out by seed
    (root / "my_rows" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return conf


def test_a_users_own_recipe_from_their_own_directory(tiny_model_dir, tmp_path):
    conf = _user_recipe(tmp_path)
    out = tmp_path / "run"
    tiny = (f"model.name_or_path={tiny_model_dir}", "trainer.max_steps=2", f"output_dir={out}")
    result = run_cli(["train", "--config-dir", "my_conf", "recipe=mine", *tiny], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the sample in my_rows (25% for validation held out of train by seed 0)" in (out / "report.md").read_text()
    meta = json.loads((out / "adapter" / "lightning_qlora.json").read_text())
    assert (meta["recipe"], meta["sample"]) == ("mine", None)
    # The same recipe through Hydra's search path; the shipped recipes stay selectable beside it.
    for recipe in ("mine", "legal"):
        shown = run_cli(
            ["train", f"hydra.searchpath=[file://{conf}]", f"recipe={recipe}", "--cfg", "job"],
            cwd=tmp_path,
            timeout=300,
        )
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert f"  name: {recipe}\n" in shown.stdout
