"""Run outputs a person reads: the loss and task-metric curves, and a short markdown report."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from lightning_qlora.app.quant_cost import describe
from lightning_qlora.io.atomic import write_text

if TYPE_CHECKING:
    from lightning_qlora.tasks.data import Task


def plot_loss(metrics_csvs: Path | list[Path], png: Path) -> bool:
    """Plot train (and val) loss from Lightning's CSV logs; False when there is nothing to plot.

    Several files (a run and its resumed continuations) are drawn as one curve.
    """
    files = [metrics_csvs] if isinstance(metrics_csvs, Path) else list(metrics_csvs)
    steps, losses, val_steps, val_losses = [], [], [], []
    for metrics_csv in (f for f in files if f.is_file()):
        with metrics_csv.open() as f:
            for row in csv.DictReader(f):
                if row.get("train_loss"):
                    steps.append(int(row["step"]))
                    losses.append(float(row["train_loss"]))
                if row.get("val_loss"):
                    val_steps.append(int(row["step"]))
                    val_losses.append(float(row["val_loss"]))
    if not losses:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, label="train loss")
    if val_losses:
        ax.plot(val_steps, val_losses, "o", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def plot_metric(points: list, metric: str, png: Path, best_step: int | None = None) -> bool:
    """Plot the task metric by step (``[step, value]`` pairs), the adapter kept at ``best_step``
    marked; False when there is nothing to plot.
    """
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, "o-", label=metric)
    best = dict(zip(steps, values, strict=True)).get(best_step)
    if best is not None:
        label = f"adapter/, the best during training: {best:.4f} at step {best_step}"
        ax.plot([best_step], [best], "*", color="tab:red", markersize=16, label=label)
    ax.set_xlabel("optimizer step (0: before training)")
    ax.set_ylabel(f"{metric} (validation)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def plot_confusion(before, after, names: tuple[str, ...], png: Path) -> None:
    """Confusion matrices (rows: true class, columns: predicted) before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, t) for m, t in ((before, "before training"), (after, "after training")) if m is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (matrix, title) in zip(axes[0], panels, strict=True):
        matrix = matrix.numpy()
        ax.imshow(matrix, cmap="Blues")
        ticks = range(len(names)) if names else range(matrix.shape[0])
        ax.set_xticks(list(ticks), names or None, rotation=30)
        ax.set_yticks(list(ticks), names or None)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_report(path: Path, cfg: DictConfig, result: dict, examples: list[dict[str, Any]], source: str) -> None:
    """A short markdown report: setup, metrics before and after, sample answers."""
    b, a = result["before"], result["after"]
    lines = [
        f"# lightning-qlora run: {cfg.recipe.name}",
        "",
        f"- model: `{cfg.model.name_or_path}`, quantization: {cfg.quant.type}"
        f" (double quant {cfg.quant.double_quant}), LoRA r={cfg.adapter.r} alpha={cfg.adapter.alpha}",
        f"- data: {source}",
        f"- steps: {cfg.trainer.max_steps}, batch size {cfg.data.batch_size}, lr {cfg.trainer.lr}",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {b[k]:.4f} | {a.get(k, float('nan')):.4f} |" for k in b]
    if result.get("test"):
        lines += ["", "Held-out test split, after training:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in result["test"].items()]
    if result.get("quant_cost"):
        lines += ["", f"Quantization: {describe(result['quant_cost'])}."]
    lines += _selection_lines(result.get("adapter"), path.parent / "metric_curve.png")
    for ex in examples:
        lines += ["", "## Sample answer", "", f"**Reference:** {ex['reference']}", ""]
        lines += [f"**Before:** {ex['before']}", "", f"**After:** {ex['after']}"]
    write_text(path, "\n".join(lines) + "\n", "report")


def _selection_lines(chosen: dict[str, Any] | None, curve: Path) -> list[str]:
    """The report's task-metric section: which adapter ``adapter/`` holds, and the metric's curve."""
    if not chosen:
        return []
    metric = chosen["metric"]
    lines = ["", f"## Task metric: {metric} ({chosen['mode']})", ""]
    if chosen["kept"] == "best":
        lines.append(
            f"`adapter/` is the best adapter by {metric}: {chosen['score']:.4f} at step {chosen['step']} of"
            f' {chosen["last_step"]}; "after" and test above measure it. `adapter-last/` is the last.'
        )
    else:
        lines.append(
            f"`adapter/` is the last adapter (step {chosen['step']}): no validation during training chose one."
        )
    if chosen.get("stopped_early"):
        lines.append(f"Training stopped early at step {chosen['last_step']}: {metric} had stopped improving.")
    if curve.is_file():
        lines += ["", f"![{metric} at each validation]({curve.name})"]
    return lines


# The metric a task's baseline (Task.baseline_score) is scored on, by task kind.
BASELINE_METRIC = {"generate": "choice_acc", "classify": "acc", "token": "f1"}
SUMMARY_KEYS = {
    "generate": ("val_loss", "val_ppl", "val_token_acc", "val_choice_acc"),
    "classify": ("val_loss", "val_acc", "val_macro_f1"),
    "token": ("val_loss", "val_precision", "val_recall", "val_f1"),
}


def round_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()}


def baselines(task: Task, splits: dict[str, list[dict]]) -> dict[str, Any] | None:
    """The task's trivial predictor (fitted on train) scored on validation and test, by metric name."""
    metric = BASELINE_METRIC.get(task.kind)
    scores = {}
    for split, prefix in (("validation", "val"), ("test", "test")):
        if metric and (found := task.baseline_score(splits.get("train", []), splits.get(split, []))) is not None:
            scores["what"], scores[f"{prefix}_{metric}"] = found[0], round(found[1], 4)
    return scores or None


def print_summary(result: dict, keys: tuple[str, ...], examples: list[dict], out: Path) -> None:
    b, a, test, base = result["before"], result["after"], result["test"], result.get("baseline", {})
    beside = lambda key: f"   ({base['what']}: {base[key]:.4f})" if key in base else ""  # noqa: E731
    print("\n=== lightning-qlora: before -> after ===")
    for key in keys:
        if key in b:
            print(f"{key:>15}: {b[key]:.4f} -> {a[key]:.4f}{beside(key)}")
    for key in (f"test_{k.removeprefix('val_')}" for k in keys):
        if key in test:
            print(f"{key:>15}: {test[key]:.4f}{' ' * 10 + beside(key) if key in base else ''}")
    for ex in examples:
        print(f"\nPrompt (end): ...{ex['prompt'][-160:]}")
        print(f"Reference:     {ex['reference']}")
        print(f"Before:        {ex['before']}")
        print(f"After:         {ex['after']}")
    if (kept := result.get("adapter")) and kept["kept"] == "best":
        print(
            f"\nadapter/ holds step {kept['step']} of {kept['last_step']}, the best by {kept['metric']}"
            f" ({kept['score']:.4f}){'; stopped early' if kept['stopped_early'] else ''}; adapter-last/ the last"
        )
    if result.get("quant_cost"):
        print(f"\n{describe(result['quant_cost'])}")
    files = "config.yaml, metrics.json, logs/, loss_curve.png, metric_curve.png, adapter/, report.md"
    print(f"\nOutputs: {out} ({files})")
