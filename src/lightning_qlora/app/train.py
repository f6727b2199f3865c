"""The training entry: compose → build → validate (before) → fit → validate, test (after) → report.

``lightning-qlora train`` (and ``train.py``, its checkout shim) hands its Hydra config to :func:`run`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.app.config import optimizer_settings, validate_config
from lightning_qlora.app.generate import generate
from lightning_qlora.app.report import plot_confusion, plot_loss, write_report
from lightning_qlora.core.adapters import AdapterConfig
from lightning_qlora.core.quant_error import write_error_report
from lightning_qlora.io.export import update_metadata
from lightning_qlora.io.models import load_tokenizer
from lightning_qlora.lightning.callbacks import LoRAAdapters
from lightning_qlora.lightning.checkpoint import META_KEY, AtomicCheckpointIO, check_configs, read_checkpoint
from lightning_qlora.lightning.faults import FaultGuard
from lightning_qlora.lightning.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy
from lightning_qlora.lightning.plugin import QLoRAPlugin
from lightning_qlora.tasks import CausalLMModule, SequenceClassificationModule
from lightning_qlora.tasks.data import (
    PromptAnswerDataModule,
    Task,
    TextClassificationDataModule,
    get_task,
    looks_like_hub_id,
    read_hub_splits,
    read_rows,
)

SPLITS = ("train", "validation", "test")
SUMMARY_KEYS = {
    "generate": ("val_loss", "val_ppl", "val_token_acc", "val_choice_acc"),
    "classify": ("val_loss", "val_acc", "val_macro_f1"),
}


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
    if out.exists() and any(out.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(
            f"output_dir {str(out)!r} already holds files from an earlier run; choose another output_dir"
            " or pass overwrite=true."
        )
    out.mkdir(parents=True, exist_ok=True)


def load_splits(data: DictConfig, task: Task, seed: int) -> tuple[dict[str, list[dict]], str]:
    """The checked rows of each split, and a one-line note of where they came from.

    Rows are checked against the task's schema before any split is held out, so that an
    error names the row by its place in the file.
    """
    if data.path is None:
        if not data.get("sample_dir"):
            raise ValueError(
                "data.path and data.sample_dir are both null; set data.path=<your rows> (jsonl, csv,"
                " parquet or a hub dataset id) or data.sample_dir=<a folder holding train.jsonl>."
            )
        folder, shipped = sample_folder(data.sample_dir)
        files = {s: folder / f"{s}.jsonl" for s in SPLITS if (folder / f"{s}.jsonl").is_file()}
        splits = {s: read_rows(f) for s, f in files.items()}
        for split, rows in splits.items():
            splits[split] = task.validate(rows, str(files[split]))
        source = f"the sample in {folder}"
        if shipped:
            source = f"the shipped sample of {data.dataset} in {data.sample_dir} (offline; set data.path for all of it)"
        if "validation" not in splits:
            splits = _hold_out(splits, data.val_fraction, seed, source)
            source += f" ({data.val_fraction:.0%} of train held out for validation by seed {seed})"
        return splits, source
    path = str(data.path)
    if looks_like_hub_id(path):
        splits = read_hub_splits(path, data.get("hub_config"))
        source = f"hub dataset {path}"
        for split, rows in splits.items():
            splits[split] = task.validate(rows, f"{path} {split}")
    else:
        splits = {"train": read_rows(path)}
        source = f"{path}"
        splits["train"] = task.validate(splits["train"], path)
    if "validation" not in splits:
        splits = _hold_out(splits, data.val_fraction, seed, source)
        source += f" ({data.val_fraction:.0%} of train held out for validation by seed {seed})"
    return splits, source


def sample_folder(sample_dir: str | os.PathLike) -> tuple[Path, bool]:
    """The folder ``data.sample_dir`` names, and whether it is a sample shipped with the package.

    ``recipes/<name>/data`` names a shipped sample, found inside the installed package, so that a
    recipe runs from any directory and a config saved with an adapter (0.1.0's too) means the same
    rows anywhere. Any other relative path is relative to the working directory.
    """
    parts = Path(sample_dir).parts
    if len(parts) > 1 and parts[0] == "recipes":
        shipped = _shipped_recipes().joinpath(*parts[1:])
        if (shipped / "train.jsonl").is_file():
            return shipped, True
    folder = Path(sample_dir)
    if not (folder / "train.jsonl").is_file():
        names = ", ".join(sorted(p.name for p in _shipped_recipes().iterdir() if (p / "data").is_dir()))
        raise FileNotFoundError(
            f"data.sample_dir={str(sample_dir)!r} has no train.jsonl (looked in {folder.resolve()}); use"
            f" recipes/<name>/data for a shipped sample ({names}), a folder of your own holding train.jsonl"
            " (validation.jsonl and test.jsonl optional), or data.path=<data file>."
        )
    return folder, False


def _shipped_recipes() -> Path:
    # find_spec locates the package without importing it (no __pycache__ among the recipes).
    spec = importlib.util.find_spec("lightning_qlora.recipes")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lightning_qlora.recipes is missing from this install; reinstall lightning-qlora.")
    return Path(next(iter(spec.submodule_search_locations)))


def _hold_out(splits: dict[str, list[dict]], fraction: float, seed: int, source: str) -> dict[str, list[dict]]:
    if not 0 < fraction < 1:
        raise ValueError(f"data.val_fraction={fraction} should be in (0, 1).")
    rows = splits["train"]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # deterministic split by seed
    n_val = max(1, round(len(rows) * fraction))
    if n_val >= len(rows):
        raise ValueError(f"{source} has {len(rows)} rows: too few to hold out a validation split.")
    return {
        **splits,
        "validation": [rows[i] for i in order[:n_val]],
        "train": [rows[i] for i in order[n_val:]],
    }


def build_logger(cfg: DictConfig, out: Path, version: str = ""):
    """CSV (default), TensorBoard, or wandb (offline when no API key is set, to sync later).

    A resumed run logs to its own ``version`` sub-folder: Lightning's CSV logger would
    otherwise delete the interrupted run's metrics file.
    """
    kind = cfg.logger.type
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(out, name="logs", version=version)
    if kind == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(out, name="logs", version=version)
    if kind == "wandb":
        offline = not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"
        if offline:
            rank_zero_info("wandb: no WANDB_API_KEY, logging offline; sync later with `wandb sync`")
        return L.pytorch.loggers.WandbLogger(project=cfg.logger.project, save_dir=str(out), offline=offline)
    raise ValueError(f"logger={kind!r} is unknown; use csv, tensorboard or wandb.")


def build_data(cfg: DictConfig, task: Task, tokenizer, splits: dict[str, list[dict]]) -> L.LightningDataModule:
    d = cfg.data
    if task.kind == "classify":
        return TextClassificationDataModule(
            tokenizer, splits, task.label, max_length=d.max_length, batch_size=d.batch_size, seed=cfg.seed
        )
    return PromptAnswerDataModule(
        tokenizer,
        splits,
        task.to_pair,
        max_length=d.max_length,
        batch_size=d.batch_size,
        system=d.system,
        seed=cfg.seed,
        choices=task.choices,
        label=task.label,
        packing=d.packing,
        choice_scoring=task.choice_scoring,
    )


def build_module(cfg: DictConfig, task: Task) -> L.LightningModule:
    """The task's LightningModule; ``optimizer=auto`` is resolved when it builds its optimizer."""
    o = optimizer_settings(cfg)  # the optimizer group, trainer.lr & co. applied
    optim = dict(lr=o["lr"], weight_decay=o["weight_decay"], warmup_steps=o["warmup_steps"], optimizer=o["name"])
    optim["low_memory"] = cfg.model.get("low_memory", "auto")
    if task.kind == "classify":
        names = task.label_names
        return SequenceClassificationModule(cfg.model.name_or_path, num_labels=len(names), label_names=names, **optim)
    return CausalLMModule(cfg.model.name_or_path, **optim)


def build_plugin(cfg: DictConfig) -> QLoRAPlugin:
    """The precision plugin for ``cfg``, holding the adapter spec too (for checks before loading)."""
    q, a = cfg.quant, cfg.adapter
    targets = a.target_modules if isinstance(a.target_modules, str) else list(a.target_modules)
    adapters = AdapterConfig(
        a.r,
        a.alpha,
        a.dropout,
        targets,
        tuple(a.modules_to_save),
        a.gradient_checkpointing,
        a.use_dora,
        a.use_rslora,
        a.init,
    )
    kwargs = dict(
        quant_type=q.type,
        double_quant=q.double_quant,
        compute_dtype=q.compute_dtype,
        skip_modules=list(q.skip_modules),
        adapters=adapters,
        keep_high_precision=q.get("keep_high_precision"),
    )
    if _is_fsdp(cfg):
        return QLoRAFSDPPlugin(quant_storage=q.get("quant_storage", "auto"), **kwargs)
    return QLoRAPlugin(quant_storage=_unsharded_storage(q.get("quant_storage", "auto")), **kwargs)


def _unsharded_storage(storage: str) -> str:
    """``quant.quant_storage=auto`` without FSDP: packed bytes as uint8, bitsandbytes' own default."""
    return "uint8" if storage == "auto" else storage


def _is_fsdp(cfg: DictConfig) -> bool:
    return cfg.trainer.get("strategy") == "fsdp"


def build_strategy(cfg: DictConfig) -> Any:
    """Lightning's strategy name as given; ``fsdp`` becomes QLoRAFSDPStrategy (the 4-bit base needs it)."""
    return QLoRAFSDPStrategy() if _is_fsdp(cfg) else cfg.trainer.strategy


_NEVER = 10**9  # epochs; Lightning takes no "off" value for check_val_every_n_epoch


def build_trainer(cfg: DictConfig, out: Path, log_version: str = "") -> L.Trainer:
    t = cfg.trainer
    plugin = build_plugin(cfg)
    adapters = LoRAAdapters.from_config(plugin.adapter_config, export_dir=out / "adapter")
    # Adapter-only checkpoints (QLoRAPlugin drops the frozen base), written atomically.
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step={step}",
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=0,
        save_last=True,
        save_on_train_epoch_end=False,
    )
    try:
        return L.Trainer(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=build_strategy(cfg),
            max_steps=t.max_steps,
            val_check_interval=t.val_check_interval,
            # No interval: no validation inside fit (run() validates before and after it), so an
            # epoch boundary does not cost a validation pass that the "after" one repeats.
            check_val_every_n_epoch=None if t.val_check_interval else _NEVER,
            accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=t.gradient_clip_val,
            # A run shorter than the logging interval would otherwise log no training loss at all.
            log_every_n_steps=max(1, min(t.log_every_n_steps, t.max_steps)),
            plugins=[plugin, AtomicCheckpointIO()],
            callbacks=[adapters, checkpoints, FaultGuard(out / "checkpoints", t.max_skipped_steps)],
            logger=build_logger(cfg, out, log_version),
            # Lightning's summary counts packed 4-bit bytes as parameters; the plugin logs true counts.
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=out,
        )
    except MisconfigurationException as err:  # e.g. more GPUs than this machine has
        raise ValueError(f"trainer: {err} Fix trainer.accelerator / trainer.devices (or use trainer=cpu).") from err


def run(cfg: DictConfig, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one fine-tune as configured; returns the metrics before and after training."""
    validate_config(cfg)
    out = Path(out or cfg.output_dir)
    ckpt = resolve_resume(cfg.get("resume"), out, build_plugin(cfg))
    if rank_zero_only.rank == 0:
        # Other ranks start after rank 0 (Lightning's launcher) or beside it (torchrun, SLURM),
        # so they would find this run's own files: the check is rank 0's.
        check_output_dir(out, cfg.overwrite, resuming=str(cfg.get("resume")) in ("last", "auto"))
    L.seed_everything(cfg.seed, verbose=False)
    task = get_task(cfg.data.task)
    splits, source = load_splits(cfg.data, task, cfg.seed)
    rank_zero_info(f"Data: {source}")

    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    dm = build_data(cfg, task, tokenizer, splits)
    module = build_module(cfg, task)
    log_version = f"resumed_{len(list((out / 'logs').glob('resumed_*'))) + 1}" if ckpt is not None else ""
    trainer = build_trainer(cfg, out, log_version)
    config_file = out / (f"config_{log_version}.yaml" if log_version else "config.yaml")
    config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))

    try:
        return _run_stages(cfg, out, ckpt, task, splits, source, tokenizer, dm, module, trainer)
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
) -> dict[str, Any]:
    """Validate (before), fit, validate and test (after), then write the report."""
    samples = splits["validation"][: cfg.sample_prompts] if task.kind == "generate" else []
    if samples and _is_fsdp(cfg):
        # generate() runs the inner model, outside FSDP's root unit, whose weights stay sharded.
        rank_zero_info("sample_prompts: skipped under FSDP; run `python -m lightning_qlora generate` on the adapter")
        samples = []
    before = trainer.validate(module, dm, verbose=False)[0]
    confusion_before = getattr(module, "confusion", {}).get("val")
    answers_before = _answers(trainer, module, tokenizer, task, samples, cfg.max_new_tokens)
    if ckpt is not None:
        rank_zero_info(f"Resuming from {ckpt}")
    trainer.fit(module, dm, ckpt_path=ckpt, weights_only=True)
    after = trainer.validate(module, dm, verbose=False)[0]
    confusion_after = getattr(module, "confusion", {}).get("val")
    answers_after = _answers(trainer, module, tokenizer, task, samples, cfg.max_new_tokens)
    test = trainer.test(module, dm, verbose=False)[0] if "test" in splits else {}

    result = {"before": _floats(before), "after": _floats(after), "test": _floats(test)}
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        plot_loss(sorted((out / "logs").glob("**/metrics.csv")), out / "loss_curve.png")
        for errors in trainer.precision_plugin.quant_errors.values():
            write_error_report(errors, out)  # quant_errors.csv and quant_errors.png
        if confusion_after is not None:
            plot_confusion(confusion_before, confusion_after, task.label_names, out / "confusion_matrix.png")
        examples = [
            {"prompt": task.to_pair(r)[0], "reference": task.to_pair(r)[1], "before": b, "after": f}
            for r, b, f in zip(samples, answers_before, answers_after, strict=True)
        ]
        if (out / "adapter").is_dir():
            # Merge and evaluate read the base, config and metrics from here.
            # The recipe and the sample by name (no paths of this machine), for evaluate to find them.
            shipped = cfg.data.path is None and sample_folder(cfg.data.sample_dir)[1]
            update_metadata(
                out / "adapter",
                base_model=str(cfg.model.name_or_path),
                recipe=OmegaConf.select(cfg, "recipe.name"),
                sample=Path(cfg.data.sample_dir).parts[1] if shipped else None,
                training_config=OmegaConf.to_yaml(cfg, resolve=True),
                metrics=result,
            )
        keys = SUMMARY_KEYS[task.kind]
        write_report(out / "report.md", cfg, result, examples, source)
        _print_summary(result, keys, examples, out)
    return result


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


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()}


def _print_summary(result: dict, keys: tuple[str, ...], examples: list[dict], out: Path) -> None:
    b, a = result["before"], result["after"]
    print("\n=== lightning-qlora: before -> after ===")
    for key in keys:
        if key in b:
            print(f"{key:>15}: {b[key]:.4f} -> {a[key]:.4f}")
    for ex in examples:
        print(f"\nPrompt (end): ...{ex['prompt'][-160:]}")
        print(f"Reference:     {ex['reference']}")
        print(f"Before:        {ex['before']}")
        print(f"After:         {ex['after']}")
    print(f"\nOutputs: {out} (config.yaml, metrics.json, logs/, loss_curve.png, adapter/, report.md)")
