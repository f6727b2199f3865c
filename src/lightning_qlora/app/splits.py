"""Where a run's rows come from: the task's schema, the shipped samples, and splits held out by seed."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

from omegaconf import DictConfig

from lightning_qlora.tasks.data import (
    Task,
    get_task,
    looks_like_hub_id,
    read_hub_splits,
    read_rows,
)
from lightning_qlora.tasks.data.tasks import with_columns

SPLITS = ("train", "validation", "test")


def task_of(data: DictConfig) -> Task:
    """``data.task``, reading the columns and classes that ``data.text_field`` & co. name."""
    names = data.get("label_names")
    return with_columns(
        get_task(data.task), data.get("text_field"), data.get("label_field"), list(names) if names else None
    )


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
        splits, held = hold_out(splits, data, seed, source)
        return splits, source + held
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
    splits, held = hold_out(splits, data, seed, source)
    return splits, source + held


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


def hold_out(splits: dict[str, list[dict]], data: DictConfig, seed: int, source: str) -> tuple[dict, str]:
    """Hold out the splits the data lacks, by seed: validation (``data.val_fraction`` of train) and, with
    ``data.test_fraction`` > 0, test (e.g. Financial PhraseBank publishes one train split). Returns the
    splits and a note of what was held out.
    """
    wanted = {"validation": data.val_fraction, "test": data.get("test_fraction") or 0.0}
    wanted = {split: fraction for split, fraction in wanted.items() if split not in splits and fraction}
    if not wanted:
        return splits, ""
    rows = splits["train"]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # deterministic split by seed
    held, start, notes = {}, 0, []
    for split, fraction in wanted.items():
        n = max(1, round(len(rows) * fraction))
        held[split] = [rows[i] for i in order[start : start + n]]
        start += n
        notes.append(f"{fraction:.0%} for {split}")
    if start >= len(rows):
        raise ValueError(f"{source} has {len(rows)} rows: too few to hold out {' and '.join(wanted)} splits.")
    held["train"] = [rows[i] for i in order[start:]]
    return {**splits, **held}, f" ({' and '.join(notes)} held out of train by seed {seed})"
