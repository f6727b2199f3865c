"""The real entry point, `python train.py`, on a tiny random model with the default tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("medical", "legal", "classification", "sentiment")
HEADS = ("classification", "sentiment")  # recipes with a sequence-classification head


def _train(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


def _tiny(model_dir: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return (
        f"model.name_or_path={model_dir}",
        "trainer.max_steps=2",
        "data.batch_size=2",
        "max_new_tokens=4",
        f"output_dir={out}",
        *extra,
    )


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_runs_end_to_end(recipe, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # One recipe covers the packed path, another quantizing while loading (with a new head to init).
    extra = {"medical": ("data.packing=true",), "classification": ("model.low_memory=true",)}.get(recipe, ())
    result = _train(f"recipe={recipe}", *_tiny(tiny_model_dir, out, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    files = ["config.yaml", "logs/metrics.csv", "loss_curve.png", "report.md", "metrics.json"]
    # Quantizing while loading (classification here) measures each layer's error as it goes.
    files += ["quant_errors.csv", "quant_errors.png"]
    for name in files:
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16
    metrics = json.loads((out / "metrics.json").read_text())
    _assert_trained(out, metrics, recipe)
    assert "val_loss" in result.stdout
    if recipe in HEADS:
        from safetensors import safe_open

        assert "score" in adapter_config["modules_to_save"]
        with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
            assert any("score" in k for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
        assert (out / "confusion_matrix.png").is_file()
        assert {"val_acc", "val_macro_f1"} <= set(metrics["after"]) and "test_macro_f1" in metrics["test"]
        # The majority class of train, scored on each split and printed beside the accuracy.
        assert metrics["baseline"]["what"] == "majority class" and "(majority class: " in result.stdout
    else:
        # yes/no/maybe for medical, A-E for legal: scored by option likelihood, one score per row
        # of the shipped sample, so each accuracy is (rows right) / (rows in that file).
        scores = {"validation": metrics["after"]["val_choice_acc"], "test": metrics["test"]["test_choice_acc"]}
        for split, acc in scores.items():
            rows = len((ROOT / "recipes" / recipe / "data" / f"{split}.jsonl").read_text().splitlines())
            assert acc * rows == pytest.approx(round(acc * rows), abs=1e-3), (split, acc, rows)


def _assert_trained(out: Path, metrics: dict, recipe: str) -> None:
    """The steps trained: every LoRA B (zero at the start) moved, and for the generative recipes the
    validation loss went down (medical 10.752 -> 10.722 in 2 steps). Not for classification: its
    head starts random, and 2 steps of batch 2 can move its validation loss either way."""
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    untouched = [name for name, t in adapter.items() if "lora_B" in name and not t.abs().sum() > 0]
    assert untouched == [] and any("lora_B" in name for name in adapter)
    if recipe not in HEADS:
        assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"] - 0.005, metrics


def test_a_sweep_writes_one_directory_per_job(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep"
    result = _train("-m", "adapter.r=2,4", *_tiny(tiny_model_dir, out, "sample_prompts=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / job / "adapter" / "adapter_config.json").read_text())["r"] for job in ("0", "1")]
    assert ranks == [2, 4]


def test_tensorboard_logger(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = _train("logger=tensorboard", *_tiny(tiny_model_dir, out, "sample_prompts=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_wandb_without_a_key_logs_offline_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    """A user's first `logger=wandb` run: no WANDB_API_KEY and no WANDB_MODE in the environment.

    wandb is a core dependency (pyproject.toml), so this never skips: a missing wandb is an install bug.
    """
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc or wandb settings holding a key
    out = tmp_path / "run"
    result = _train("logger=wandb", *_tiny(tiny_model_dir, out, "sample_prompts=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    note = "wandb: no WANDB_API_KEY, logging offline; sync later with `wandb sync`"
    assert (result.stdout + result.stderr).count(note) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (run,) = (out / "wandb").glob("offline-run-*")  # offline, so nothing was sent
    assert list(run.glob("run-*.wandb")), sorted(p.name for p in run.iterdir())
    assert not list((out / "wandb").glob("run-*")), "an online run was started"


def _one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert needle in result.stderr, result.stderr[-2000:]


def test_missing_data_file(tmp_path):
    result = _train("data.path=/nonexistent/rows.jsonl", f"output_dir={tmp_path / 'o'}")
    _one_line_error(result, "error: Data file '/nonexistent/rows.jsonl' does not exist")


def test_rows_missing_fields_and_labels_outside_the_set(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"item {i}", "label": i % 4}) for i in range(9)) + "\n")
    rows.write_text(rows.read_text() + json.dumps({"text": "odd", "label": 7}) + "\n")
    result = _train("recipe=classification", f"data.path={rows}", f"output_dir={tmp_path / 'o'}")
    _one_line_error(result, "label=7 is outside the label set (0=World, 1=Sports, 2=Business, 3=Sci/Tech)")
    rows.write_text(json.dumps({"question": "q?", "final_decision": "yes"}) + "\n")
    result = _train("recipe=medical", f"data.path={rows}", f"output_dir={tmp_path / 'o2'}")
    _one_line_error(result, "row 0: missing field 'context.contexts'")


def test_hub_dataset_without_datasets_package_says_what_to_do(tmp_path):
    result = _train("data.path=qiaojin/PubMedQA", f"output_dir={tmp_path / 'o'}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        _one_line_error(result, "pip install datasets, or download the data and pass a local")
    else:  # with datasets installed but no hub reachable, the load fails with a one-line hint
        _one_line_error(result, "download it and pass data.path=<local jsonl/csv/parquet file>")


def test_unknown_key_recipe_and_model(tmp_path):
    _one_line_error(_train("adapter.rank=4", f"output_dir={tmp_path / 'o'}"), "Key 'rank' is not in struct")
    _one_line_error(_train("recipe=cooking", f"output_dir={tmp_path / 'o'}"), "Could not find 'recipe/cooking'")
    result = _train("model.name_or_path=/models/nope", f"output_dir={tmp_path / 'o3'}")
    _one_line_error(result, "Model path '/models/nope' does not exist")


def test_earlier_run_is_never_overwritten(tmp_path):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "report.md").write_text("precious")
    _one_line_error(_train(f"output_dir={out}"), "already holds files from an earlier run")
    assert (out / "report.md").read_text() == "precious"


def _logged_losses(out: Path) -> dict[int, float]:
    import csv

    losses = {}
    for path in sorted((out / "logs").glob("**/metrics.csv")):
        with path.open() as f:
            losses.update({int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")})
    return losses


def test_killed_run_resumes_on_the_same_loss_curve(tiny_model_dir, tmp_path):
    """SIGKILL a run right after its first checkpoint, resume=last, and compare with an uninterrupted run."""
    import signal
    import time

    common = ("recipe=medical", f"model.name_or_path={tiny_model_dir}", "data.batch_size=2", "sample_prompts=0")
    common += ("trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2", "trainer.max_steps=12")
    # The default adapter path (the medical recipe turns it off): recompute reuse, replayed dropout masks.
    common += ("adapter.gradient_checkpointing=true",)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(*common, f"output_dir={full}").returncode == 0
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *common, f"output_dir={part}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = part / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    try:
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:  # also when the test fails or times out here: no child outlives it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = torch.load(last, weights_only=True)["global_step"]
    assert step < 12
    # Resuming with another adapter config is refused before any model loads, and touches nothing.
    before = last.read_bytes()
    _one_line_error(_train(*common, "adapter.r=8", f"output_dir={part}", "resume=last"), "another adapter config")
    assert last.read_bytes() == before
    second = _train(*common, f"output_dir={part}", "resume=last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (part / "logs" / "resumed_1" / "metrics.csv").is_file() and (part / "config_resumed_1.yaml").is_file()
    expected, resumed = _logged_losses(full), _logged_losses(part)
    after = [s for s in range(step, 12)]  # Lightning logs the loss of step s+1 at step s
    assert set(after) <= set(resumed)
    torch.testing.assert_close(torch.tensor([resumed[s] for s in after]), torch.tensor([expected[s] for s in after]))


def test_resume_without_or_with_a_broken_checkpoint(tmp_path):
    out = tmp_path / "o"
    _one_line_error(_train(f"output_dir={out}", "resume=last"), "resume=last found no checkpoint at")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    _one_line_error(_train(f"output_dir={tmp_path / 'o2'}", f"resume={broken}"), "is truncated or corrupted")
    assert broken.read_bytes() == b"PK\x03\x04 not really a zip"


def test_sigterm_saves_a_checkpoint_and_says_how_to_continue(tiny_model_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = ("recipe=medical", f"model.name_or_path={tiny_model_dir}", "data.batch_size=2", "sample_prompts=0")
    args += ("trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=5", f"output_dir={out}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not (out / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:  # max_steps=100000: a child left running would train for hours
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "error: received SIGTERM; saved" in stderr and "resume=last" in stderr
    step = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    # The guard saved at the step boundary where the signal was handled, and says so.
    assert f"SIGTERM: saved {out / 'checkpoints' / 'last.ckpt'} at step {step};" in stderr
    assert f"at step {step}. Continue with" in stderr


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tiny_model_dir, tmp_path):
    """The disk fills after the first checkpoint (tests/cli/full_disk_train.py's hook): the second write fails."""
    out = tmp_path / "run"
    args = ("recipe=medical", f"model.name_or_path={tiny_model_dir}", "data.batch_size=2", "sample_prompts=0")
    args += ("trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", f"output_dir={out}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    child = ROOT / "tests" / "cli" / "full_disk_train.py"
    result = subprocess.run(
        [sys.executable, str(child), "train", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    last = out / "checkpoints" / "last.ckpt"
    # torch's zip writer raised "RuntimeError: [enforce fail at inline_container.cc] unexpected pos": one line now.
    _one_line_error(result, f"error: could not write checkpoint {last}: disk full or file too large (File too large);")
    assert result.returncode == 2 and sum(ln.startswith("error:") for ln in result.stderr.splitlines()) == 1
    assert torch.load(last, weights_only=True)["global_step"] == 2  # the previous checkpoint, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temp file left


def test_config_problems_fail_fast_in_one_line(tmp_path):
    result = _train("adapter.r=0", "trainer.lr=-1", f"output_dir={tmp_path / 'o'}")
    _one_line_error(result, "error: config has 2 problems: adapter.r=0 should be a positive integer")
    assert "trainer.lr=-1 should be a positive number" in result.stderr


def test_no_secret_reaches_the_output_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    secret = "wandb-key-0123456789abcdef0123456789abcdef01234567"
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": secret, "WANDB_SILENT": "true", "HF_TOKEN": secret}
    result = _train("logger=wandb", *_tiny(tiny_model_dir, out, "sample_prompts=0"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    leaked = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
    assert secret not in result.stdout + result.stderr
    assert "trust_remote_code: false" in (out / "config.yaml").read_text()  # off unless the user sets it


def test_gpus_that_do_not_exist_fail_before_weights_load(tiny_model_dir, tmp_path):
    import shutil

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the case is a machine without one")
    # A model with its config and tokenizer but no weights: a run that loaded weights first would
    # stop on the missing file instead (and the default model would be converted, in a quick test).
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    result = _train(
        "trainer=ddp", "trainer.devices=2", f"model.name_or_path={weightless}", f"output_dir={tmp_path / 'o'}"
    )
    _one_line_error(result, "error: trainer: ")
    assert "Fix trainer.accelerator / trainer.devices" in result.stderr


# The classification recipe: the causal path under FSDP is tests/lightning/test_fsdp.py's, and this one adds
# the trained head (modules_to_save) to the sharded units.
@pytest.mark.parametrize("recipe", ["classification"])
def test_fsdp_on_two_cpu_processes(recipe, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    fsdp = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
    result = _train(f"recipe={recipe}", *_tiny(tiny_model_dir, out, *fsdp))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    _assert_trained(out, metrics, recipe)
    from safetensors import safe_open

    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert len(names) == 28 + (recipe == "classification"), names  # LoRA on 14 layers, and the head
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(saved["state_dict"]) == len(names)
