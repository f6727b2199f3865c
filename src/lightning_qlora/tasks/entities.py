"""Entity-level precision, recall and F1 as CoNLL-2003 scores them (``conlleval``), from ``seqeval``.

An entity counts as found only when its type and its exact span match. Chunks follow
conlleval: a ``B-X`` opens one, and so does an ``I-X`` after ``O`` or after another type.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_qlora.tasks.metrics import IGNORE_INDEX


def require_seqeval():
    """``seqeval.metrics``, or an ``ImportError`` that says how to install it."""
    try:
        import seqeval.metrics
    except ImportError as err:
        raise ImportError(
            "entity-level scores (the ner recipe) need seqeval, which is not installed."
            ' Fix: pip install seqeval (or pip install -e ".[ner]").'
        ) from err
    return seqeval.metrics


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """``precision``, ``recall`` and ``f1`` over all entities (micro), and ``f1_<TYPE>`` for each type
    found in ``gold`` or ``pred``; one tag sequence per sentence, IOB tags as strings. No entity: 0.
    """
    metrics = require_seqeval()
    if not gold:  # seqeval refuses an empty list
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with warnings.catch_warnings():  # numpy's empty-mean warnings when a split has no entity at all
        warnings.simplefilter("ignore", RuntimeWarning)
        report = metrics.classification_report(
            [list(s) for s in gold], [list(s) for s in pred], output_dict=True, zero_division=0
        )
    overall = report["micro avg"]
    scores = {"precision": overall["precision"], "recall": overall["recall"], "f1": overall["f1-score"]}
    for name, row in report.items():
        if not name.endswith(" avg"):
            scores[f"f1_{name}"] = row["f1-score"]
    return {key: float(value) for key, value in scores.items()}


class EntityMetrics(Metric):
    """:func:`entity_scores` over an evaluation, its tag sequences gathered from every DDP rank.

    Each sentence's gold tags are all its words' (``word_labels``); a word that truncation cut
    before its labelled sub-token is predicted ``O``, so that a cut entity counts as missed.
    """

    full_state_update = False

    def __init__(self, label_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_seqeval()
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
