import pytest
import torch

from lightning_qlora.tasks.data import PromptAnswerDataModule, collate, encode_pair
from lightning_qlora.tasks.metrics import IGNORE_INDEX


class CharTokenizer:
    """A real (if simple) tokenizer: one id per character, no chat template, EOS = 1."""

    chat_template = None
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 250 + 2 for c in text]}


def test_loss_only_on_the_answer_and_eos():
    enc = encode_pair(CharTokenizer(), "ab", "xyz", max_length=64)
    # Prompt "ab\n" (3 tokens) is masked; answer "xyz" + EOS are the labels.
    assert enc.labels[:3] == [IGNORE_INDEX] * 3
    assert enc.labels[3:] == enc.input_ids[3:] and enc.input_ids[-1] == 1
    assert len(enc.input_ids) == 7 and not enc.truncated


def test_truncation_is_counted_and_rows_without_answer_dropped():
    tok = CharTokenizer()
    rows = [{"p": "a" * 20, "a": "b"}, {"p": "c", "a": "d" * 30}, {"p": "e", "a": "f"}]
    dm = PromptAnswerDataModule(tok, {"train": rows, "validation": rows[2:]}, lambda r: (r["p"], r["a"]), max_length=16)
    dm.setup("fit")
    assert len(dm.encoded["train"]) == 2  # the first row was cut inside its prompt
    assert all(len(e.input_ids) <= 16 for e in dm.encoded["train"])
    assert dm.encoded["train"][0].truncated


def test_collate_pads_right_with_masked_labels():
    tok = CharTokenizer()
    batch = collate([encode_pair(tok, "a", "b", 64), encode_pair(tok, "aaaa", "b", 64)], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert (batch["labels"][0, 4:] == IGNORE_INDEX).all()
    assert batch["input_ids"].dtype == torch.long


def test_empty_split_is_refused():
    with pytest.raises(ValueError, match="'validation' split is empty"):
        PromptAnswerDataModule(CharTokenizer(), {"train": [{}], "validation": []}, lambda r: ("", ""))


def test_packing_keeps_examples_apart():
    from lightning_qlora.tasks.data.formatting import pack

    tok = CharTokenizer()
    examples = [encode_pair(tok, "ab", "c", 64), encode_pair(tok, "d", "efg", 64), encode_pair(tok, "h" * 8, "i", 64)]
    assert [r.doc_lengths for r in pack(examples, max_length=10)] == [[5], [6], [11]]  # 11 > 10: kept whole
    rows = pack(examples[:2], max_length=16)
    assert rows[0].doc_lengths == [5, 6] and len(rows[0].input_ids) == 11
    batch = collate(rows, pad_id=0)
    mask, positions = batch["attention_mask"], batch["position_ids"]
    assert mask.shape == (1, 1, 11, 11) and mask.dtype == torch.bool
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    assert not mask[0, 0, 6, :5].any()  # the second example cannot see the first
    assert mask[0, 0, 6, 5:7].all()
