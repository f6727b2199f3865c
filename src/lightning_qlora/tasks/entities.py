"""Entity-level precision, recall and F1 as CoNLL-2003 scores them (``conlleval``).

An entity counts as found only when its type and its exact span match. Chunks follow
conlleval, for IOB1, IOB2 and IOBES tags: a ``B-X`` or ``S-X`` opens one, and so does an
``I-X`` or ``E-X`` after ``O``, after an ``E``/``S``, or after another type. These are the rules
``seqeval``'s default mode follows; written here, they spare the install scikit-learn and SciPy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_qlora.tasks.metrics import IGNORE_INDEX


def _split(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", "_")``: prefix letter and type, as seqeval reads them."""
    return tag[:1], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _starts(prev: str, prev_kind: str, tag: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if tag in ("I", "E") and prev in ("O", "E", "S"):
        return True
    return tag not in ("O", ".") and kind != prev_kind


def _ends(prev: str, prev_kind: str, tag: str, kind: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev not in ("O", ".") and kind != prev_kind


def chunks(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence as ``(type, first, last)`` word positions, conlleval's way."""
    found, start = set(), None
    prev, prev_kind = "O", "_"
    for i, (tag, kind) in enumerate(_split(t) for t in [*tags, "O"]):
        if start is not None and _ends(prev, prev_kind, tag, kind):
            found.add((prev_kind, start, i - 1))
            start = None
        if _starts(prev, prev_kind, tag, kind):
            start = i
        prev, prev_kind = tag, kind
    return found


def _prf(right: int, found: int, expected: int) -> tuple[float, float, float]:
    """Precision, recall and F1, 0 where undefined; F1 from the two rates, as seqeval computes it."""
    precision = right / found if found else 0.0
    recall = right / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """``precision``, ``recall`` and ``f1`` over all entities (micro), and ``f1_<TYPE>`` for each type
    found in ``gold`` or ``pred``; one tag sequence per sentence, IOB tags as strings. No entity: 0.
    """
    if len(gold) != len(pred):
        raise ValueError(f"entity_scores got {len(gold)} gold and {len(pred)} predicted sentences; pass one each.")
    right, found, expected = Counter(), Counter(), Counter()
    for n, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {n} has {len(gold_tags)} gold tags and {len(pred_tags)} predicted; pass one per word."
            )
        truth, guess = chunks(gold_tags), chunks(pred_tags)
        right.update(kind for kind, *_ in truth & guess)
        found.update(kind for kind, *_ in guess)
        expected.update(kind for kind, *_ in truth)
    overall = _prf(sum(right.values()), sum(found.values()), sum(expected.values()))
    scores = dict(zip(("precision", "recall", "f1"), overall, strict=True))
    for kind in sorted(found.keys() | expected.keys()):
        scores[f"f1_{kind}"] = _prf(right[kind], found[kind], expected[kind])[2]
    return scores


class EntityMetrics(Metric):
    """:func:`entity_scores` over an evaluation, its tag sequences gathered from every DDP rank.

    Each sentence's gold tags are all its words' (``word_labels``); a word that truncation cut
    before its labelled sub-token is predicted ``O``, so that a cut entity counts as missed.
    """

    full_state_update = False

    def __init__(self, label_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label_names = tuple(label_names)
        self.outside = self.label_names.index("O")
        # Flat tag ids and the sentence lengths that split them: "cat" gathers ragged lists across ranks.
        self.add_state("pred", [], dist_reduce_fx="cat")
        self.add_state("gold", [], dist_reduce_fx="cat")
        self.add_state("lengths", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, labels: Tensor, word_labels: Tensor | None = None) -> None:
        """``preds``, ``labels``: (batch, tokens), -100 where unlabelled; ``word_labels``: (batch, words)."""
        gold_rows = labels if word_labels is None else word_labels
        for pred_row, label_row, gold_row in zip(preds, labels, gold_rows, strict=True):
            pred = pred_row[label_row != IGNORE_INDEX]
            gold = gold_row[gold_row != IGNORE_INDEX]
            missing = gold.numel() - pred.numel()
            pred = torch.cat([pred, pred.new_full((missing,), self.outside)])
            self.pred.append(pred.long())
            self.gold.append(gold.long())
            self.lengths.append(torch.tensor([gold.numel()], device=gold.device))

    def compute(self) -> dict[str, float]:
        """:func:`entity_scores` of every sentence seen."""
        if isinstance(self.lengths, list) and not self.lengths:
            return entity_scores([], [])
        names = self.label_names
        # .long(): a rank that saw no data sends an empty float tensor, and the gathered ones follow it.
        lengths, pred, gold = (dim_zero_cat(state).long().tolist() for state in (self.lengths, self.pred, self.gold))
        gold_seqs, pred_seqs, start = [], [], 0
        for n in lengths:
            gold_seqs.append([names[t] for t in gold[start : start + n]])
            pred_seqs.append([names[t] for t in pred[start : start + n]])
            start += n
        return entity_scores(gold_seqs, pred_seqs)
