"""Entity-level scores (CoNLL-2003's conlleval definition), by hand, and gathered from two ranks."""

import pytest
import torch
from torchmetrics.utilities import dim_zero_cat

from lightning_qlora.tasks.data.tasks import CONLL2003_TAGS
from lightning_qlora.tasks.entities import EntityMetrics, chunks, entity_scores

X = -100


def test_entity_scores_by_hand():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC"],  # PER(0-1), LOC(3)
        ["O", "I-ORG", "I-ORG", "O", "B-MISC"],  # ORG(1-2): an I- after O opens an entity (conlleval); MISC(4)
        ["B-PER", "I-PER"],  # PER(0-1)
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-ORG"],  # PER(0-1) right; ORG(3) wrong type
        ["O", "B-ORG", "I-ORG", "O", "O"],  # ORG(1-2) right; MISC missed
        ["B-PER", "O"],  # PER(0) wrong span: no credit
    ]
    # 5 gold entities, 4 predicted, 2 right.
    p, r = 2 / 4, 2 / 5
    scores = entity_scores(gold, pred)
    assert scores["precision"] == pytest.approx(p)
    assert scores["recall"] == pytest.approx(r)
    assert scores["f1"] == pytest.approx(2 * p * r / (p + r))  # 4/9
    # Per type, F1 = 2TP / (2TP + FP + FN): PER 2/(2+1+1), ORG 2/(2+1+0), LOC and MISC never right.
    assert scores["f1_PER"] == pytest.approx(2 / 4)
    assert scores["f1_ORG"] == pytest.approx(2 / 3)
    assert scores["f1_LOC"] == 0 and scores["f1_MISC"] == 0


def test_no_entities_score_zero():
    assert entity_scores([["O", "O"]], [["O", "O"]])["f1"] == 0
    assert entity_scores([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def _rank_batches():
    """Two ranks' batches (tag ids: O=0, B-PER=1, I-PER=2, B-ORG=3, I-ORG=4, B-LOC=5)."""
    # Rank 0: gold B-PER I-PER B-LOC on the last sub-token of each word; predicted B-PER I-PER O.
    a = dict(preds=torch.tensor([[0, 1, 2, 0, 0]]), labels=torch.tensor([[X, 1, 2, X, 5]]))
    a["word_labels"] = torch.tensor([[1, 2, 5]])
    # Rank 1: row 0 was cut before its 4th word (B-LOC): it counts as predicted O, so as missed.
    # Row 1 is padded: one word, B-PER, predicted right.
    b = dict(preds=torch.tensor([[3, 0, 4, 0], [1, 7, 7, 7]]), labels=torch.tensor([[3, X, 4, 0], [1, X, X, X]]))
    b["word_labels"] = torch.tensor([[3, 4, 0, 5], [1, X, X, X]])
    return a, b


def test_a_cut_word_counts_as_missed():
    _, b = _rank_batches()
    metric = EntityMetrics(CONLL2003_TAGS)
    metric.update(**b)
    # Gold ORG(0-1), LOC(3), PER(0); predicted ORG(0-1), PER(0).
    scores = metric.compute()
    assert (scores["precision"], scores["recall"]) == pytest.approx((1.0, 2 / 3))
    assert scores["f1_LOC"] == 0


def test_scores_are_gathered_from_every_rank():
    a, b = _rank_batches()
    other = EntityMetrics(CONLL2003_TAGS)
    other.update(**b)
    # What all_gather would return on rank 0, state by state in the order they were added.
    theirs = iter([dim_zero_cat(other.pred), dim_zero_cat(other.gold), dim_zero_cat(other.lengths)])
    gathered = EntityMetrics(
        CONLL2003_TAGS, dist_sync_fn=lambda t, group=None: [t, next(theirs)], distributed_available_fn=lambda: True
    )
    gathered.update(**a)
    alone = EntityMetrics(CONLL2003_TAGS)
    alone.update(**a)
    # Rank 0 alone: gold PER, LOC; predicted PER -> P 1, R 1/2.
    assert alone.compute()["recall"] == pytest.approx(1 / 2)
    # Both ranks: gold PER, LOC, ORG, LOC, PER (5); predicted PER, ORG, PER (3), all right.
    scores = gathered.compute()
    p, r = 3 / 3, 3 / 5
    assert (scores["precision"], scores["recall"]) == pytest.approx((p, r))
    assert scores["f1"] == pytest.approx(2 * p * r / (p + r))
    assert (scores["f1_PER"], scores["f1_ORG"], scores["f1_LOC"]) == pytest.approx((1.0, 1.0, 0.0))


def test_iobes_and_iob1_chunks_by_hand():
    # IOBES: S- is a one-word entity, E- closes one; an I- after E- opens a new one.
    assert chunks(["S-LOC", "B-PER", "E-PER", "I-PER", "O"]) == {("LOC", 0, 0), ("PER", 1, 2), ("PER", 3, 3)}
    # IOB1: I- continues across words, a B- splits two entities of one type, a type change splits too.
    assert chunks(["I-ORG", "I-ORG", "B-ORG", "I-LOC", "I-LOC"]) == {("ORG", 0, 1), ("ORG", 2, 2), ("LOC", 3, 4)}
    assert chunks([]) == set() and chunks(["O", "O"]) == set()


def test_sentences_of_unequal_lengths_are_refused():
    with pytest.raises(ValueError, match=r"got 2 gold and 1 predicted sentences; pass one each"):
        entity_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match=r"sentence 0 has 2 gold tags and 1 predicted; pass one per word"):
        entity_scores([["B-PER", "O"]], [["B-PER"]])
