"""The training entry: compose → build → validate (before) → fit → validate (after) → report.

``train.py`` at the repo root hands its Hydra config to :func:`run`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.callbacks import LoRAAdapters
from lightning_qlora.data import PromptAnswerDataModule, get_task, read_rows
from lightning_qlora.generation import generate
from lightning_qlora.models import load_tokenizer
from lightning_qlora.modules import CausalLMModule
from lightning_qlora.plugin import QLoRAPlugin
from lightning_qlora.report import plot_loss, write_report

SPLITS = ("train", "validation", "test")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into an earlier run's directory unless asked."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(out)!r} already holds files from an earlier run; choose another output_dir"
            " or pass overwrite=true."
        )
    out.mkdir(parents=True, exist_ok=True)


def load_splits(data: DictConfig, seed: int) -> tuple[dict[str, list[dict]], str]:
    """The rows of each split, and a one-line note of where they came from."""
    if data.path is None:
        folder = Path(data.sample_dir)
        splits = {s: read_rows(folder / f"{s}.jsonl") for s in SPLITS if (folder / f"{s}.jsonl").is_file()}
        return splits, f"the shipped sample of {data.dataset} in {folder} (offline; set data.path for the full set)"
    rows = read_rows(data.path)
    if not 0 < data.val_fraction < 1:
        raise ValueError(f"data.val_fraction={data.val_fraction} should be in (0, 1).")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # deterministic split by seed
    n_val = max(1, round(len(rows) * data.val_fraction))
    if n_val >= len(rows):
        raise ValueError(f"{data.path} has {len(rows)} rows: too few to hold out a validation split.")
    splits = {"validation": [rows[i] for i in order[:n_val]], "train": [rows[i] for i in order[n_val:]]}
    return splits, f"{data.path} ({len(rows)} rows, {n_val} held out for validation by seed {seed})"


def build_logger(cfg: DictConfig, out: Path):
    """CSV (default), TensorBoard, or wandb (offline when no API key is set)."""
    kind = cfg.logger.type
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(out, name="logs", version="")
    if kind == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(out, name="logs", version="")
    if kind == "wandb":
        import os

        offline = not os.environ.get("WANDB_API_KEY")
        return L.pytorch.loggers.WandbLogger(project=cfg.logger.project, save_dir=str(out), offline=offline)
    raise ValueError(f"logger={kind!r} is unknown; use csv, tensorboard or wandb.")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one fine-tune as configured; returns the before/after metrics."""
    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.overwrite)
    L.seed_everything(cfg.seed, verbose=False)
    task = get_task(cfg.data.task)
    splits, source = load_splits(cfg.data, cfg.seed)
    for split, rows in splits.items():
        task.validate(rows, split)
    rank_zero_info(f"Data: {source}")

    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    dm = PromptAnswerDataModule(
        tokenizer,
        splits,
        task.to_pair,
        max_length=cfg.data.max_length,
        batch_size=cfg.data.batch_size,
        system=cfg.data.system,
        seed=cfg.seed,
    )
    t = cfg.trainer
    module = CausalLMModule(
        cfg.model.name_or_path, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, optimizer=t.optimizer
    )
    q, a = cfg.quant, cfg.adapter
    plugin = QLoRAPlugin(q.type, q.double_quant, q.compute_dtype, q.quant_storage, list(q.skip_modules))
    adapters = LoRAAdapters(
        a.r,
        a.alpha,
        a.dropout,
        _targets(a.target_modules),
        list(a.modules_to_save),
        a.gradient_checkpointing,
        export_dir=out / "adapter",
    )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        # A run shorter than the logging interval would otherwise log no training loss at all.
        log_every_n_steps=max(1, min(t.log_every_n_steps, t.max_steps)),
        plugins=[plugin],
        callbacks=[adapters],
        logger=build_logger(cfg, out),
        enable_checkpointing=False,
        # Lightning's summary counts packed 4-bit bytes as parameters; the plugin logs true counts.
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    samples = splits["validation"][: cfg.sample_prompts]
    before = trainer.validate(module, dm, verbose=False)[0]
    answers_before = [generate(module.model, tokenizer, task.to_pair(r)[0], cfg.max_new_tokens) for r in samples]
    trainer.fit(module, dm)
    after = trainer.validate(module, dm, verbose=False)[0]
    answers_after = [generate(module.model, tokenizer, task.to_pair(r)[0], cfg.max_new_tokens) for r in samples]

    result = {"before": _floats(before), "after": _floats(after)}
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        plot_loss(out / "logs" / "metrics.csv", out / "loss_curve.png")
        examples = [
            {"prompt": task.to_pair(r)[0], "reference": task.to_pair(r)[1], "before": b, "after": f}
            for r, b, f in zip(samples, answers_before, answers_after, strict=False)
        ]
        write_report(out / "report.md", cfg, result, examples, source)
        _print_summary(result, examples, out)
    return result


def _targets(value: Any) -> str | list[str]:
    return value if isinstance(value, str) else list(value)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()}


def _print_summary(result: dict, examples: list[dict], out: Path) -> None:
    b, a = result["before"], result["after"]
    print("\n=== lightning-qlora: before -> after ===")
    for key in ("val_loss", "val_ppl", "val_token_acc"):
        print(f"{key:>14}: {b[key]:.4f} -> {a[key]:.4f}")
    for ex in examples:
        print(f"\nPrompt (end): ...{ex['prompt'][-160:]}")
        print(f"Reference:     {ex['reference']}")
        print(f"Before:        {ex['before']}")
        print(f"After:         {ex['after']}")
    print(f"\nOutputs: {out} (config.yaml, logs/metrics.csv, loss_curve.png, adapter/, report.md)")
