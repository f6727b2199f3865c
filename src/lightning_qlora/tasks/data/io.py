"""Reading rows from jsonl / json / csv / parquet files, with errors that name the line."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a local data file as dicts.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown format, a malformed line (named by number), or no rows.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist; check data.path (jsonl, csv or parquet).")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text at byte {err.start}; re-save the file as UTF-8.") from err
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"Data file {str(path)!r} has an unknown format; use one of: {', '.join(SUFFIXES)}.")
    if not rows:
        raise ValueError(f"Data file {str(path)!r} holds no rows.")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file; every bad line is counted and the first few named, never skipped silently."""
    rows, bad = [], {"malformed": [], "not UTF-8": [], "not an object": []}
    first_error = ""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad["not UTF-8"].append(number)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad["malformed"].append(number)
                first_error = first_error or err.msg
                continue
            if not isinstance(row, dict):
                bad["not an object"].append(number)
                continue
            rows.append(row)
    problems = {kind: lines for kind, lines in bad.items() if lines}
    if problems:
        total = sum(len(v) for v in problems.values())
        if total == 1:
            (kind, (number,)), *_ = problems.items()
            detail = f" ({first_error})" if kind == "malformed" else ""
            raise ValueError(f"{path}:{number}: {kind} JSON line{detail}; fix or delete that line.")
        parts = [
            f"{len(v)} {k} (lines {', '.join(map(str, v[:5]))}{', ...' if len(v) > 5 else ''})"
            for k, v in problems.items()
        ]
        raise ValueError(
            f"{path}: {total} bad lines of {total + len(rows)}: {'; '.join(parts)}; fix or delete them"
            " (re-save as UTF-8 for encoding errors)."
        )
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text at byte {err.start}; re-save the file as UTF-8.") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} ({err.msg}).") from err
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of objects.")
    return data


def looks_like_hub_id(path: str) -> bool:
    """``owner/name`` with no local file of that name and no data-file suffix."""
    return (
        not Path(path).expanduser().exists()
        and not path.lower().endswith(SUFFIXES)
        and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
    )


def read_hub_splits(dataset_id: str, config: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """All splits of a Hugging Face hub dataset as lists of rows (needs `datasets` and network)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"data.path={dataset_id!r} is a hub dataset id, which needs the `datasets` package:"
            " pip install datasets, or download the data and pass a local jsonl/csv/parquet file."
        ) from err
    try:
        loaded = datasets.load_dataset(dataset_id, config)
    except Exception as err:  # network, auth and missing-dataset errors all end the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"Could not load dataset {dataset_id!r} from the hub ({first}); download it and pass"
            " data.path=<local jsonl/csv/parquet file>."
        ) from err
    return {split: loaded[split].to_list() for split in loaded}
