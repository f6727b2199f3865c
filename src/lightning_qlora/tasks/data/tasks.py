"""Row schemas of the public datasets our recipes use, and how each becomes a prompt.

Each task checks its rows up front, so that a bad row fails with its index and the
missing field instead of deep inside tokenization.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
Row = dict[str, Any]
MAX_EMPTY_FRACTION = 0.1  # more empty rows than this means a wrong column, not a few bad rows


@dataclass(frozen=True)
class Task:
    """A dataset schema: required fields, and the (prompt, answer) it gives.

    ``kind`` is ``"generate"`` (causal LM, loss on the answer), ``"classify"`` (a
    classification head over ``text``) or ``"token"`` (a tag per word of ``text_field``, from
    ``tags``). ``choices`` are the answer openings scored by likelihood for the choice accuracy:
    by their first token (Yes/No/Maybe), or by the mean log-likelihood of the whole option
    (``choice_scoring="sequence"``, e.g. CaseHOLD's holdings).
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
    text_field: str = "text"  # what a classification head reads; a token task's list of words
    tags: Callable[[Row], list[int]] | None = None  # a token task's tag id per word (label_names[id])
    # (train rows, evaluated rows) -> (what the baseline is, its score on the task metric). None: the
    # majority class of train scored on the evaluated rows, for tasks with a label.
    baseline: Callable[[list[Row], list[Row]], tuple[str, float]] | None = None

    def baseline_score(self, train: list[Row], rows: list[Row]) -> tuple[str, float] | None:
        """A trivial predictor's score on ``rows``, to print beside the task metric (None: no baseline)."""
        if not train or not rows:
            return None
        if self.baseline is not None:
            return self.baseline(train, rows)
        if self.label is None:
            return None
        counts: dict[int, int] = {}
        for row in train:
            counts[self.label(row)] = counts.get(self.label(row), 0) + 1
        majority = max(counts, key=counts.__getitem__)
        return "majority class", sum(self.label(r) == majority for r in rows) / len(rows)

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
                for check in filter(None, (self.label, self.tags)):
                    try:
                        check(row)
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


# --- Text classification: AG News, Financial PhraseBank, any text,label file -------------
def class_label(label_names: Sequence[str], field: str = "label") -> Callable[[Row], int]:
    """Row -> class index, from an integer id (csv cells may hold its digits) or a label name (any case)."""
    by_name = {name.lower(): i for i, name in enumerate(label_names)}
    names = ", ".join(f"{i}={n}" for i, n in enumerate(label_names))

    def label(row: Row) -> int:
        value = row[field]
        if isinstance(value, str) and value.strip().lower() in by_name:
            return by_name[value.strip().lower()]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"{field}={row[field]!r} is a {type(row[field]).__name__} that names no class; the {field} column"
                f" must hold class ids or names ({names}); set data.label_names to the file's names."
            )
        if not 0 <= value < len(label_names):
            raise ValueError(
                f"{field}={row[field]!r} is outside the label set ({names}); set data.label_names to all"
                " the classes, in the order of their ids."
            )
        return value

    return label


def classify_task(name: str, dataset: str, label_names: Sequence[str], text_field: str, label_field: str) -> Task:
    """A classification task over ``text_field`` with integer (or named) classes in ``label_field``."""
    return Task(
        name=name,
        dataset=dataset,
        required=(text_field, label_field),
        label=class_label(label_names, label_field),
        kind="classify",
        label_names=tuple(label_names),
        text_field=text_field,
    )


def with_columns(
    task: Task, text_field: str | None, label_field: str | None, label_names: Sequence[str] | None
) -> Task:
    """``task`` reading another file's columns and classes (``data.text_field`` & co.; None keeps the task's)."""
    if task.kind != "classify":
        keys = {"text_field": text_field, "label_field": label_field, "label_names": label_names}
        given = [key for key, value in keys.items() if value]
        if given:
            raise ValueError(
                f"data.{given[0]} applies to classification recipes; data.task={task.name!r} has fixed fields."
            )
        return task
    if label_names is not None and len(label_names) < 2:
        raise ValueError(f"data.label_names={list(label_names)} should name at least 2 classes.")
    return classify_task(
        task.name,
        task.dataset,
        tuple(label_names) if label_names else task.label_names,
        text_field or task.text_field,
        label_field or task.required[1],
    )


AG_NEWS = classify_task("ag_news", "fancyzhx/ag_news", ("World", "Sports", "Business", "Sci/Tech"), "text", "label")
# takala/financial_phrasebank (sentences_50agree and the other agreement levels): one train split.
FINANCIAL_PHRASEBANK = classify_task(
    "financial_phrasebank", "takala/financial_phrasebank", ("negative", "neutral", "positive"), "sentence", "label"
)


# --- CoNLL-2003 named entities (eriktks/conll2003) -----------------------------------------
# The hub's ner_tags ClassLabel, in id order (IOB2: B- opens an entity, I- continues it).
CONLL2003_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
_CONLL_IDS = {name: i for i, name in enumerate(CONLL2003_TAGS)}


def _conll_tags(row: Row) -> list[int]:
    """Row -> one tag id per word of ``tokens``, from ids (the published schema) or names (``"B-PER"``)."""
    words, tags = row["tokens"], row["ner_tags"]
    if not isinstance(words, list) or not isinstance(tags, list):
        raise TypeError(
            f"tokens and ner_tags should be lists, not {type(words).__name__} and {type(tags).__name__};"
            " give each row its words and one tag per word."
        )
    if len(words) != len(tags):
        raise ValueError(f"tokens has {len(words)} words but ner_tags has {len(tags)} tags; give one tag per word.")
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"tokens[{i}]={word!r} is not a word; every entry of tokens must be a non-empty string.")
    ids = []
    for i, tag in enumerate(tags):
        value = tag.strip() if isinstance(tag, str) else tag
        if isinstance(value, str):  # a name, or an id's digits (csv)
            value = _CONLL_IDS.get(value, int(value) if value.isdigit() else None)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(CONLL2003_TAGS):
            names = ", ".join(f"{k}={n}" for k, n in enumerate(CONLL2003_TAGS))
            raise ValueError(f"ner_tags[{i}]={tag!r} is not a CoNLL-2003 tag; use an id or name of: {names}.")
        ids.append(value)
    return ids


def _conll_baseline(train: list[Row], rows: list[Row]) -> tuple[str, float]:
    """Entity F1 on ``rows`` of tagging each word with its most frequent tag in ``train`` (unseen: O).

    Ties go to the lower tag id (O first). The CoNLL-2003 paper's baseline is the same idea.
    """
    from lightning_qlora.tasks.entities import entity_scores

    counts: dict[str, dict[int, int]] = {}
    for row in train:
        for word, tag in zip(row["tokens"], _conll_tags(row), strict=True):
            seen = counts.setdefault(word, {})
            seen[tag] = seen.get(tag, 0) + 1
    best = {word: min(seen, key=lambda t, seen=seen: (-seen[t], t)) for word, seen in counts.items()}
    gold = [[CONLL2003_TAGS[t] for t in _conll_tags(row)] for row in rows]
    pred = [[CONLL2003_TAGS[best.get(word, 0)] for word in row["tokens"]] for row in rows]
    return "most frequent tag per word in train", entity_scores(gold, pred)["f1"]


CONLL2003 = Task(
    name="conll2003",
    dataset="eriktks/conll2003",
    required=("tokens", "ner_tags"),
    kind="token",
    label_names=CONLL2003_TAGS,
    id_field="id",
    text_field="tokens",
    tags=_conll_tags,
    baseline=_conll_baseline,
)

TASKS = {t.name: t for t in (PUBMEDQA, PUBMEDQA_DECISION, CASEHOLD, AG_NEWS, FINANCIAL_PHRASEBANK, CONLL2003)}


def get_task(name: str) -> Task:
    """The task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"data.task={name!r} is unknown; use one of: {', '.join(TASKS)}.")
    return TASKS[name]
