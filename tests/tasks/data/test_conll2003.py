"""The conll2003 task: its row checks, and its baseline by hand."""

import pytest

from lightning_qlora.tasks.data import get_task

TASK = get_task("conll2003")


def _row(tokens, tags, i="0"):
    return {"id": i, "tokens": tokens, "ner_tags": tags}


def test_tags_are_ids_or_names():
    row = _row(["Ann", "visits", "Oslo", "Bank"], [1, "O", "B-ORG", " I-ORG"])
    assert TASK.validate([row], "train") == [row]
    assert TASK.tags(row) == [1, 0, 3, 4]
    assert TASK.tags(_row(["x"], ["8"])) == [8]  # an id's digits, as a csv cell holds it
    assert TASK.kind == "token" and TASK.label_names[:3] == ("O", "B-PER", "I-PER") and len(TASK.label_names) == 9


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            _row(["Ann", "visits"], [1]),
            "train row 1: tokens has 2 words but ner_tags has 1 tags; give one tag per word.",
        ),
        (_row(["Ann"], ["B-PERSON"]), "train row 1: ner_tags[0]='B-PERSON' is not a CoNLL-2003 tag; use an id or"),
        (_row(["Ann"], [9]), "train row 1: ner_tags[0]=9 is not a CoNLL-2003 tag"),
        (_row(["Ann"], [True]), "train row 1: ner_tags[0]=True is not a CoNLL-2003 tag"),
        (_row(["Ann", " "], [1, 0]), "train row 1: tokens[1]=' ' is not a word; every entry of tokens must be"),
        (_row("Ann visits", [1, 0]), "train row 1: tokens and ner_tags should be lists, not str and list"),
        ({"id": "1", "tokens": ["Ann"]}, "train row 1: missing field 'ner_tags' required by the conll2003 format"),
    ],
)
def test_bad_rows_are_named_in_one_line(row, message):
    good = _row(["Oslo"], [5])
    with pytest.raises(ValueError) as err:
        TASK.validate([good, row], "train")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_baseline_by_hand():
    train = [
        _row(["Ann", "visits", "Oslo"], ["B-PER", "O", "B-LOC"]),
        _row(["Oslo", "Bank", "hires", "Ann"], ["B-ORG", "I-ORG", "O", "B-PER"]),
        _row(["Oslo", "is", "cold"], ["B-LOC", "O", "O"]),
        _row(["Paris", "and", "Paris"], ["B-LOC", "O", "B-ORG"]),  # a tie: the lower id wins, B-ORG (3) < B-LOC (5)
    ]
    # Most frequent: Ann B-PER, Oslo B-LOC (2 of 3), Bank I-ORG, Paris B-ORG (tie), the rest O; unseen: O.
    rows = [
        # Predicted B-PER O B-LOC I-ORG: PER(0) right, LOC(2) wrong, ORG(3) wrong span (gold ORG is 2-3).
        _row(["Ann", "visits", "Oslo", "Bank"], ["B-PER", "O", "B-ORG", "I-ORG"]),
        # Predicted B-ORG O O B-PER: ORG(0) and PER(3) wrong; gold LOC(0), LOC(1) missed.
        _row(["Paris", "Lund", "visits", "Ann"], ["B-LOC", "B-LOC", "O", "O"]),
    ]
    what, f1 = TASK.baseline_score(train, rows)
    # 1 right of 5 predicted and 4 gold entities.
    p, r = 1 / 5, 1 / 4
    assert what == "most frequent tag per word in train"
    assert f1 == pytest.approx(2 * p * r / (p + r))
    assert TASK.baseline_score(train, []) is None
