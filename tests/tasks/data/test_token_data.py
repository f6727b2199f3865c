"""Token classification data: pre-split words to sub-words, one tag per word on its first or last sub-token."""

import pytest

from lightning_qlora.tasks.data import TokenClassificationDataModule, align_labels, get_task, words_tokenizer

X = -100  # unscored
# Tag ids of CoNLL-2003: O=0, B-PER=1, B-LOC=5.
ROW = {"id": "0", "tokens": ["Ann", "visits", "Oslo", "Ann", "visits", "Oslo"], "ner_tags": [1, 0, 5, 1, 0, 5]}


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE with hand-written merges, like GPT-2's / SmolLM2's (no prefix space of its own).

    With the leading space: Ann -> [ĠAnn], visits -> [Ġvis, its], Oslo -> [ĠOs, lo], . -> [Ġ.].
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("Ġ", "A"), ("ĠA", "n"), ("ĠAn", "n"), ("Ġ", "v"), ("Ġv", "i"), ("Ġvi", "s"), ("i", "t"), ("it", "s")]
    merges += [("Ġ", "O"), ("ĠO", "s"), ("l", "o"), ("Ġ", ".")]
    vocab = {"<pad>": 0}
    for piece in [*sorted(set("ĠAnvistOlo.")), *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


def _pieces(tokenizer, words):
    return tokenizer(words, is_split_into_words=True, add_special_tokens=False).tokens()


def test_byte_level_words_get_their_leading_space(byte_bpe):
    # Without it, "visits" is tokenized as the inside of a word.
    assert _pieces(byte_bpe, ["visits"]) == ["v", "i", "s", "its"]
    fixed = words_tokenizer(byte_bpe)
    assert _pieces(fixed, ["Ann", "visits", "Oslo", "."]) == ["ĠAnn", "Ġvis", "its", "ĠOs", "lo", "Ġ."]
    assert _pieces(byte_bpe, ["visits"]) == ["v", "i", "s", "its"]  # the caller's tokenizer is left alone
    assert words_tokenizer(fixed) is fixed  # nothing left to fix


def test_pre_split_words_tokenize_as_running_text_with_the_default_tokenizer():
    from tests.cli.conftest import default_tokenizer

    tokenizer = default_tokenizer()
    words = ["John", "Smithson", "lives", "in", "Zurichberg", "."]
    split = words_tokenizer(tokenizer)(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert split == tokenizer(" " + " ".join(words), add_special_tokens=False)["input_ids"]


def test_align_labels_by_hand():
    # Tokens ĠAnn Ġvis its ĠOs lo Ġ. (word ids 0 1 1 2 2 3); tags B-PER O B-LOC O.
    word_ids, tags = [0, 1, 1, 2, 2, 3], [1, 0, 5, 0]
    assert align_labels(word_ids, tags, "first") == [1, 0, X, 5, X, 0]
    assert align_labels(word_ids, tags, "last") == [1, X, 0, X, 5, 0]
    # Special tokens (None) are never scored.
    assert align_labels([None, 0, 0, None], [1], "first") == [X, 1, X, X]
    assert align_labels([None, 0, 0, None], [1], "last") == [X, X, 1, X]
    with pytest.raises(ValueError, match="label_subword='middle' is unknown; use first or last"):
        align_labels(word_ids, tags, "middle")


def _module(tokenizer, subword, max_length=64):
    rows = [ROW]
    dm = TokenClassificationDataModule(
        tokenizer, {"train": rows, "validation": rows}, get_task("conll2003").tags, "tokens", subword, max_length, 2
    )
    dm.setup()
    return next(iter(dm.val_dataloader()))


@pytest.mark.parametrize(
    ("subword", "max_length", "expected"),
    [
        # ĠAnn Ġvis its ĠOs lo | ĠAnn Ġvis its ĠOs lo: 10 tokens, all kept.
        ("first", 64, [1, 0, X, 5, X, 1, 0, X, 5, X]),
        ("last", 64, [1, X, 0, X, 5, 1, X, 0, X, 5]),
        # Cut inside the last "Oslo" (after ĠOs): its first sub-token keeps the tag; its last is gone.
        ("first", 9, [1, 0, X, 5, X, 1, 0, X, 5]),
        ("last", 9, [1, X, 0, X, 5, 1, X, 0, X]),
    ],
)
def test_batches_keep_labels_on_their_tokens_through_truncation(byte_bpe, subword, max_length, expected):
    batch = _module(byte_bpe, subword, max_length)
    assert batch["labels"][0].tolist() == expected
    assert batch["input_ids"].shape == (1, len(expected)) and batch["attention_mask"].sum() == len(expected)
    # Every word's tag, cut or not: the entity scores count a cut entity as missed.
    assert batch["word_labels"][0].tolist() == ROW["ner_tags"]


def test_padding_is_unscored(byte_bpe):
    short = {"id": "1", "tokens": ["Oslo"], "ner_tags": ["B-LOC"]}
    dm = TokenClassificationDataModule(
        byte_bpe, {"train": [ROW], "validation": [ROW, short]}, get_task("conll2003").tags, label_subword="last"
    )
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"][1].tolist() == [X, 5] + [X] * 8  # ĠOs lo, then padding
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * 8
    assert batch["word_labels"][1].tolist() == [5] + [X] * 5


def test_unknown_label_subword(byte_bpe):
    with pytest.raises(ValueError, match="label_subword='both' is unknown"):
        TokenClassificationDataModule(
            byte_bpe, {"train": [ROW], "validation": [ROW]}, lambda r: [], label_subword="both"
        )
