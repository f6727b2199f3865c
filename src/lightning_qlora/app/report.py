"""Run outputs a person reads: the loss curve and a short markdown report."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


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
    for ex in examples:
        lines += ["", "## Sample answer", "", f"**Reference:** {ex['reference']}", ""]
        lines += [f"**Before:** {ex['before']}", "", f"**After:** {ex['after']}"]
    path.write_text("\n".join(lines) + "\n")
