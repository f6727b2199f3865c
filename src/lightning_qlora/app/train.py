"""The training entry: compose → build → validate (before) → fit → validate, test (after) → report.

``lightning-qlora train`` (and ``train.py``, its checkout shim) hands its Hydra config to :func:`run`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.app.build import build_data, build_module, build_plugin, build_trainer, is_fsdp
from lightning_qlora.app.config import task_metric, validate_config
from lightning_qlora.app.generate import generate
from lightning_qlora.app.quant_cost import describe, quant_cost, unquantized_val_loss
from lightning_qlora.app.report import (
    SUMMARY_KEYS,
    baselines,
    plot_confusion,
    plot_loss,
    plot_metric,
    print_summary,
    round_metrics,
    write_report,
)
from lightning_qlora.app.splits import load_splits, sample_folder, task_of
from lightning_qlora.core.quant_error import write_error_report
from lightning_qlora.io.atomic import write_text
from lightning_qlora.io.export import update_metadata
from lightning_qlora.io.models import load_tokenizer
from lightning_qlora.lightning.best import BestAdapter, Monitor
from lightning_qlora.lightning.checkpoint import META_KEY, check_configs, read_checkpoint
from lightning_qlora.lightning.lock import LOCK_FILE, OutputDirLock, remove_interrupted_writes
from lightning_qlora.lightning.plugin import QLoRAPlugin
from lightning_qlora.tasks.data import (
    Task,
)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM (preemption); the message says what was saved."""


def resolve_resume(resume: str | None, out: Path, plugin: QLoRAPlugin | None = None) -> Path | None:
    """The checkpoint to resume from, checked here: ``None``; ``"last"`` or ``"auto"`` (this output_dir's
    newest checkpoint; ``auto`` starts fresh when there is none, for requeued cluster jobs); or a path.
    """
    if resume in (None, ""):
        return None
    if str(resume) == "auto":
        found = [out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")]  # ours, and SLURM requeue's
        found = [p for p in found if p.is_file()]
        if not found:
            return None
        path = max(found, key=lambda p: p.stat().st_mtime)
    elif str(resume) == "last":
        path = out / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"resume=last found no checkpoint at {path}; set output_dir to the run to continue,"
                " or resume=PATH to a .ckpt file."
            )
    else:
        path = Path(str(resume))
    # A missing, truncated or foreign file, or another adapter/quant config, fails here,
    # before any model loads; the base model itself is checked once it is loaded.
    saved = read_checkpoint(path)[META_KEY]
    if plugin is not None:
        now = plugin.configs_before_setup()
        for then in saved["models"].values():
            check_configs(then, now, str(path))
    return path


def check_output_dir(out: Path, overwrite: bool, resuming: bool = False) -> None:
    """Refuse to write into an earlier run's directory unless asked (or continuing it)."""
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(
            f"output_dir {str(out)!r} already holds files from an earlier run; choose another output_dir"
            " or pass overwrite=true."
        )
    out.mkdir(parents=True, exist_ok=True)


def run(cfg: DictConfig, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one fine-tune as configured; returns the metrics before and after training."""
    validate_config(cfg)
    out = Path(out or cfg.output_dir)
    # Rank 0 holds output_dir's lock for the run's life: a second run started on it is refused here,
    # before it writes anything; the kernel lets go of it when this process dies, even by SIGKILL.
    lock = OutputDirLock(out).acquire() if rank_zero_only.rank == 0 else None
    try:
        return _run_locked(cfg, out)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ckpt = resolve_resume(cfg.get("resume"), out, build_plugin(cfg))
    if rank_zero_only.rank == 0:
        # Other ranks start after rank 0 (Lightning's launcher) or beside it (torchrun, SLURM),
        # so they would find this run's own files: the check is rank 0's.
        check_output_dir(out, cfg.overwrite, resuming=str(cfg.get("resume")) in ("last", "auto"))
        remove_interrupted_writes(out)  # a killed run's temp files: no one else writes here now
    L.seed_everything(cfg.seed, verbose=False)
    task = task_of(cfg.data)
    splits, source = load_splits(cfg.data, task, cfg.seed)
    rank_zero_info(f"Data: {source}")

    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    dm = build_data(cfg, task, tokenizer, splits)
    module = build_module(cfg, task)
    log_version = f"resumed_{len(list((out / 'logs').glob('resumed_*'))) + 1}" if ckpt is not None else ""
    # Opt-in: the base's validation loss before the plugin quantizes it (app/quant_cost.py).
    unquantized = unquantized_val_loss(cfg, module, dm) if cfg.get("measure_quant_cost") else None
    trainer = build_trainer(cfg, out, log_version)
    config_file = out / (f"config_{log_version}.yaml" if log_version else "config.yaml")
    write_text(config_file, OmegaConf.to_yaml(cfg, resolve=True), "run config")

    try:
        return _run_stages(cfg, out, ckpt, task, splits, source, tokenizer, dm, module, trainer, unquantized)
    except SIGTERMException as err:  # a SystemExit(0) subclass: without this the job would look successful
        last = out / "checkpoints" / "last.ckpt"
        saved = f"saved {last} at step {trainer.global_step}" if last.is_file() else "no checkpoint was saved"
        raise Preempted(
            f"received SIGTERM; {saved}. Continue with:"
            f" lightning-qlora train <same overrides> output_dir={out} resume=last"
        ) from err


def _run_stages(
    cfg: DictConfig,
    out: Path,
    ckpt: Path | None,
    task: Task,
    splits: dict[str, list[dict]],
    source: str,
    tokenizer,
    dm: L.LightningDataModule,
    module: L.LightningModule,
    trainer: L.Trainer,
    unquantized: float | None = None,
) -> dict[str, Any]:
    """Validate (before), fit, validate and test (after), then write the report."""
    samples = splits["validation"][: cfg.sample_prompts] if task.kind == "generate" else []
    if samples and is_fsdp(cfg):
        # generate() runs the inner model, outside FSDP's root unit, whose weights stay sharded.
        rank_zero_info("sample_prompts: skipped under FSDP; run `python -m lightning_qlora generate` on the adapter")
        samples = []
    before = trainer.validate(module, dm, verbose=False)[0]
    monitor = task_metric(cfg)
    monitor.value(before)  # a task metric this task never logs fails here, before any training
    cost = quant_cost(unquantized, before["val_loss"], cfg.quant.type) if unquantized is not None else None
    if cost is not None:
        rank_zero_info(describe(cost))
    confusion_before = getattr(module, "confusion", {}).get("val")
    answers_before = _answers(trainer, module, tokenizer, task, samples, cfg.max_new_tokens)
    if ckpt is not None:
        rank_zero_info(f"Resuming from {ckpt}")
    trainer.fit(module, dm, ckpt_path=ckpt, weights_only=True)
    after = trainer.validate(module, dm, verbose=False)[0]  # the best adapter, when BestAdapter kept one
    confusion_after = getattr(module, "confusion", {}).get("val")
    answers_after = _answers(trainer, module, tokenizer, task, samples, cfg.max_new_tokens)
    test = trainer.test(module, dm, verbose=False)[0] if "test" in splits else {}

    selection = _selection(trainer, monitor, before, after)
    result = {"before": round_metrics(before), "after": round_metrics(after), "test": round_metrics(test)}
    result["adapter"] = selection
    if (baseline := baselines(task, splits)) is not None:
        result["baseline"] = baseline
    if cost is not None:
        result["quant_cost"] = cost
    if trainer.is_global_zero:
        write_text(out / "metrics.json", json.dumps(result, indent=2), "metrics")
        plot_loss(sorted((out / "logs").glob("**/metrics.csv")), out / "loss_curve.png")
        best_step = selection["step"] if selection["kept"] == "best" else None
        plot_metric(selection["curve"], monitor.metric, out / "metric_curve.png", best_step)
        for errors in trainer.precision_plugin.quant_errors.values():
            write_error_report(errors, out)  # quant_errors.csv and quant_errors.png
        if confusion_after is not None:
            plot_confusion(confusion_before, confusion_after, task.label_names, out / "confusion_matrix.png")
        examples = [
            {"prompt": task.to_pair(r)[0], "reference": task.to_pair(r)[1], "before": b, "after": f}
            for r, b, f in zip(samples, answers_before, answers_after, strict=True)
        ]
        # Merge and evaluate read the base, config and metrics from here.
        # The recipe and the sample by name (no paths of this machine), for evaluate to find them.
        shipped = cfg.data.path is None and sample_folder(cfg.data.sample_dir)[1]
        run_meta = dict(
            base_model=str(cfg.model.name_or_path),
            recipe=OmegaConf.select(cfg, "recipe.name"),
            sample=Path(cfg.data.sample_dir).parts[1] if shipped else None,
            training_config=OmegaConf.to_yaml(cfg, resolve=True),
        )
        if (out / "adapter").is_dir():  # the adapter measured "after" and on test
            update_metadata(out / "adapter", **run_meta, metrics=result, selection=selection)
        if (out / "adapter-last").is_dir():  # the last, measured only during fit
            last = {"kept": "last", "step": selection["last_step"]}
            update_metadata(out / "adapter-last", **run_meta, metrics=None, selection=last)
        keys = SUMMARY_KEYS[task.kind]
        write_report(out / "report.md", cfg, result, examples, source)
        print_summary(result, keys, examples, out)
    return result


def _selection(trainer: L.Trainer, monitor: Monitor, before: dict, after: dict) -> dict[str, Any]:
    """Which adapter ``adapter/`` holds: the best by the task metric during fit (BestAdapter), else the last;
    and the metric's curve: ``[step, value]`` before training (step 0), at each validation during fit, or
    else after training.

    The curve is not read from the CSV logs: Lightning logs a validation during fit at the step before
    (its ``_batches_that_stepped``) and one outside fit at the step itself, which the file does not tell apart.
    """
    best = next((c for c in trainer.callbacks if isinstance(c, BestAdapter)), None)
    stopper = trainer.early_stopping_callback
    stopped = stopper is not None and stopper.stopping_reason_message is not None
    if stopped:
        rank_zero_info(f"Early stopping at step {trainer.global_step}: {stopper.stopping_reason_message}")
    kept = best is not None and best.best_step is not None
    during = [[step, round(value, 4)] for step, value in best.history] if best is not None else []
    point = lambda step, metrics: [step, round(float(metrics[monitor.metric]), 4)]  # noqa: E731
    return {
        "metric": monitor.metric,
        "mode": monitor.mode,
        "kept": "best" if kept else "last",
        "step": best.best_step if kept else trainer.global_step,
        "score": round(best.best_score, 4) if kept else None,
        "last_step": trainer.global_step,
        "stopped_early": stopped,
        "curve": [point(0, before), *(during or [point(trainer.global_step, after)])],
    }


def _answers(trainer: L.Trainer, module, tokenizer, task: Task, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Rank 0's greedy answers to ``rows``, generated on the training device; other ranks get none."""
    if not rows or not trainer.is_global_zero:
        return []
    # Lightning's teardown left the module on CPU: generating there would take minutes for a large
    # model, and int8 layers keep their quantization state on the GPU (it does not follow .cpu()).
    module.to(trainer.strategy.root_device)
    # The plugin's forward context (16-bit autocast on GPU) applies to generation as to training.
    with trainer.precision_plugin.forward_context():
        return [generate(module.model, tokenizer, task.to_pair(r)[0], max_new_tokens) for r in rows]
