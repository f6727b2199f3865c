"""Row schemas of the public datasets our recipes use, and how each becomes a prompt.

Each task checks its rows up front, so that a bad row fails with its index and the
missing field instead of deep inside tokenization.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
Row = dict[str, Any]
MAX_EMPTY_FRACTION = 0.1  # more empty rows than this means a wrong column, not a few bad rows


@dataclass(frozen=True)
class Task:
    """A dataset schema: required fields, and the (prompt, answer) it gives.

    ``kind`` is ``"generate"`` (causal LM, loss on the answer) or ``"classify"`` (a
    classification head over ``text``). ``choices`` are the answer openings scored by
    likelihood for the choice accuracy: by their first token (Yes/No/Maybe), or by the mean
    log-likelihood of the whole option (``choice_scoring="sequence"``, e.g. CaseHOLD's holdings).
    """

    name: str
    dataset: str
    required: tuple[str, ...]
    to_pair: Callable[[Row], tuple[str, str]] | None = None
    choices: Callable[[Row], list[str]] | None = None
    label: Callable[[Row], int] | None = None
    kind: str = "generate"
    label_names: tuple[str, ...] = ()
    choice_scoring: str = "first_token"  # or "sequence": mean log-likelihood of each whole option
    id_field: str | None = None  # the dataset's row id, checked for duplicates

    def validate(self, rows: list[Row], split: str) -> list[Row]:
        """The rows that fit the schema; raise ``ValueError`` naming the first row and field that don't.

        Rows whose required text is empty are dropped with a warning that counts them, up to
        ``MAX_EMPTY_FRACTION`` of the split; more than that is an error, never a silent loss.
        Duplicated ids are counted in a warning.
        """
        empty: list[int] = []
        for index, row in enumerate(rows):
            for field in self.required:
                value = _get(row, field)
                if value is None:
                    raise ValueError(
                        f"{split} row {index}: missing field {field!r} required by the {self.name} format"
                        f" ({self.dataset}); fix the row or point data.path at a file in that schema."
                    )
                if isinstance(value, str) and not value.strip() or isinstance(value, list) and not value:
                    empty.append(index)
                    break
            else:
                if self.label is not None:
                    try:
                        self.label(row)
                    except (KeyError, ValueError, TypeError) as err:
                        raise ValueError(f"{split} row {index}: {err}") from err
        _warn_duplicates(rows, self.id_field, split)
        if not empty:
            return rows
        where = f"rows {', '.join(map(str, empty[:5]))}{', ...' if len(empty) > 5 else ''}"
        if len(empty) > MAX_EMPTY_FRACTION * len(rows):
            raise ValueError(
                f"{split}: {len(empty)} of {len(rows)} rows have an empty required field ({where}); that is most"
                f" of the data, so nothing was dropped: check the file's columns against the {self.name} format."
            )
        log.warning("%s: dropped %d of %d rows with an empty required field (%s).", split, len(empty), len(rows), where)
        skip = set(empty)
        return [row for i, row in enumerate(rows) if i not in skip]


def _warn_duplicates(rows: list[Row], id_field: str | None, split: str) -> None:
    if id_field is None or not rows or id_field not in rows[0]:
        return
    seen: dict[Any, int] = {}
    for row in rows:
        key = row.get(id_field)
        seen[key] = seen.get(key, 0) + 1
    dups = [k for k, n in seen.items() if n > 1]
    if dups:
        extra = sum(seen[k] - 1 for k in dups)
        log.warning(
            "%s: %d rows repeat an earlier %s (e.g. %r); they are kept, deduplicate the file if unintended.",
            split,
            extra,
            id_field,
            dups[0],
        )


def _get(row: Row, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# --- PubMedQA (qiaojin/PubMedQA, pqa_labeled) ---------------------------------
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


def _pubmedqa_prompt(row: Row) -> str:
    context = " ".join(row["context"]["contexts"])
    return (
        f"Read the abstract and answer the question with yes, no or maybe, then explain.\n\n"
        f"Abstract: {context}\n\nQuestion: {row['question']}"
    )


def _pubmedqa_label(row: Row) -> int:
    decision = str(row["final_decision"]).strip().lower()
    if decision not in PUBMEDQA_OPTIONS:
        raise ValueError(f"final_decision={row['final_decision']!r} is not one of yes, no, maybe.")
    return PUBMEDQA_OPTIONS.index(decision)


def _pubmedqa_pair(row: Row) -> tuple[str, str]:
    decision = PUBMEDQA_OPTIONS[_pubmedqa_label(row)]
    return _pubmedqa_prompt(row), f"{decision.capitalize()}. {row['long_answer']}"


PUBMEDQA = Task(
    name="pubmedqa",
    dataset="qiaojin/PubMedQA pqa_labeled",
    required=("question", "context.contexts", "long_answer", "final_decision"),
    to_pair=_pubmedqa_pair,
    choices=lambda row: [o.capitalize() for o in PUBMEDQA_OPTIONS],
    label=_pubmedqa_label,
    id_field="pubid",
)


def _pubmedqa_decision_pair(row: Row) -> tuple[str, str]:
    context = " ".join(row["context"]["contexts"])
    prompt = "Read the abstract and answer the question with yes, no or maybe."
    prompt += f"\n\nAbstract: {context}\n\nQuestion: {row['question']}"
    return prompt, f"{PUBMEDQA_OPTIONS[_pubmedqa_label(row)].capitalize()}."


# The decision alone: every answer token is the decision, instead of 1 in ~30 next to the explanation.
PUBMEDQA_DECISION = Task(
    name="pubmedqa_decision",
    dataset="qiaojin/PubMedQA pqa_labeled",
    required=("question", "context.contexts", "final_decision"),
    to_pair=_pubmedqa_decision_pair,
    choices=lambda row: [o.capitalize() for o in PUBMEDQA_OPTIONS],
    label=_pubmedqa_label,
    id_field="pubid",
)


# --- CaseHOLD (casehold/casehold) ------------------------------------------------
def _casehold_label(row: Row) -> int:
    label = str(row["label"]).strip()
    if label not in {"0", "1", "2", "3", "4"}:
        raise ValueError(f"label={row['label']!r} is not one of 0-4 (the index of the correct holding).")
    return int(label)


def _casehold_pair(row: Row) -> tuple[str, str]:
    # Cloze form, as CaseHOLD is scored for language models: the model reads the citing
    # context and writes the holding; the five candidates are compared by likelihood.
    prompt = f"Write the holding that the cited case stands for at <HOLDING>.\n\n{row['citing_prompt']}"
    return prompt, str(row[f"holding_{_casehold_label(row)}"])


CASEHOLD = Task(
    name="casehold",
    dataset="casehold/casehold",
    required=("citing_prompt", *(f"holding_{i}" for i in range(5)), "label"),
    to_pair=_casehold_pair,
    choices=lambda row: [str(row[f"holding_{i}"]) for i in range(5)],
    label=_casehold_label,
    choice_scoring="sequence",
    id_field="example_id",
)


# --- AG News (fancyzhx/ag_news) -----------------------------------------------------
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def _ag_news_label(row: Row) -> int:
    label = row["label"]
    names = ", ".join(f"{i}={n}" for i, n in enumerate(AG_NEWS_LABELS))
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)  # csv cells are strings
    if isinstance(label, bool) or not isinstance(label, int):
        raise TypeError(
            f"label={row['label']!r} is a {type(row['label']).__name__}; the label column must hold integer"
            f" class ids ({names})."
        )
    if not 0 <= label < len(AG_NEWS_LABELS):
        raise ValueError(f"label={row['label']!r} is outside the label set ({names}).")
    return label


AG_NEWS = Task(
    name="ag_news",
    dataset="fancyzhx/ag_news",
    required=("text", "label"),
    label=_ag_news_label,
    kind="classify",
    label_names=AG_NEWS_LABELS,
)

TASKS = {t.name: t for t in (PUBMEDQA, PUBMEDQA_DECISION, CASEHOLD, AG_NEWS)}


def get_task(name: str) -> Task:
    """The task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"data.task={name!r} is unknown; use one of: {', '.join(TASKS)}.")
    return TASKS[name]
