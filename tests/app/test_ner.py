"""The ner recipe end to end on a tiny random Llama: train 2 steps, export, merge, evaluate."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from lightning_qlora.app.evaluate import compose_config, evaluate_saved_adapter
from lightning_qlora.app.splits import load_splits
from lightning_qlora.app.train import run
from lightning_qlora.tasks.data import get_task
from lightning_qlora.tasks.data.tasks import CONLL2003_TAGS

# Fictional sentences (ours), CoNLL-2003's schema; tags as ids or names.
SENTENCES = [
    (["Mara", "Lindqvist", "joined", "Borvik", "Tools", "in", "Tallow", "."], [1, 2, 0, 3, 4, 0, 5, 0]),
    (["The", "Quenby", "Cup", "starts", "on", "Friday", "."], ["O", "B-MISC", "I-MISC", "O", "O", "O", "O"]),
    (["Oren", "Vale", "left", "Harlow", "Bay", "."], [1, 2, 0, 5, 6, 0]),
    (["Fenwick", "Rail", "hired", "Ida", "Moss", "."], [3, 4, 0, 1, 2, 0]),
]


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": str(start + i), "tokens": SENTENCES[i % 4][0], "ner_tags": SENTENCES[i % 4][1]} for i in range(n)]


def _write(folder, splits: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    from transformers import LlamaForTokenClassification

    from tests.cli.conftest import default_tokenizer
    from tests.conftest import tiny_llama_config

    tmp = tmp_path_factory.mktemp("ner")
    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), num_labels=9, pad_token_id=tokenizer.pad_token_id)
    LlamaForTokenClassification(config).save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    _write(tmp / "data", {"train": _rows(8), "validation": _rows(4, 8), "test": _rows(4, 12)})
    overrides = [f"model.name_or_path={tmp / 'model'}", f"data.sample_dir={tmp / 'data'}", f"output_dir={tmp / 'run'}"]
    cfg = compose_config(["recipe=ner", "trainer.max_steps=2", "data.batch_size=2", "sample_prompts=0", *overrides])
    return tmp, run(cfg)


def test_two_steps_of_the_recipe(ner_run, capsys):
    tmp, result = ner_run
    out = tmp / "run"
    # Validation holds train's 4 sentences: two optimizer steps on them lower its loss.
    assert result["after"]["val_loss"] < result["before"]["val_loss"]
    # The three entity scores are one computation's (CoNLL's): F1 is the harmonic mean of the other two.
    for scores, prefix in ((result["after"], "val"), (result["test"], "test")):
        p, r, f1 = (scores[f"{prefix}_{k}"] for k in ("precision", "recall", "f1"))
        assert f1 == pytest.approx(2 * p * r / (p + r) if p + r else 0.0, abs=2e-4)
    # Per-type F1 beside the overall figure, one per CoNLL-2003 entity type.
    assert {f"test_f1_{t}" for t in ("PER", "ORG", "LOC", "MISC")} <= set(result["test"])
    # The same 4 sentences in train and test: the most-frequent-tag baseline tags every test entity right.
    assert result["baseline"]["test_f1"] == pytest.approx(1.0)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "score" in adapter_config["modules_to_save"] and adapter_config["task_type"] == "TOKEN_CLS"
    meta = json.loads((out / "adapter" / "lightning_qlora.json").read_text())
    assert meta["task"] == "token-classification" and meta["label_names"] == list(CONLL2003_TAGS)


def test_evaluate_and_merge_the_adapter(ner_run):
    from transformers import AutoModelForTokenClassification

    from lightning_qlora.io.merge import merge

    tmp, result = ner_run
    adapter = tmp / "run" / "adapter"
    # A fresh base, quantized as in training, plus the saved adapter scores what the trained module scored.
    scores = evaluate_saved_adapter(str(adapter))
    assert scores["test_loss"] == pytest.approx(result["test"]["test_loss"], abs=1e-3)
    assert scores["test_f1"] == pytest.approx(result["test"]["test_f1"])

    merged_dir = merge(adapter, tmp / "merged", dtype="fp32")
    merged = AutoModelForTokenClassification.from_pretrained(merged_dir).eval()
    assert [merged.config.id2label[i] for i in range(9)] == list(CONLL2003_TAGS)
    assert "AutoModelForTokenClassification" in (merged_dir / "README.md").read_text()
    # The merged model's validation loss is the adapter's: the same function, without peft or bitsandbytes.
    from lightning_qlora.app.build import build_data

    dm = build_data(
        compose_config(["recipe=ner"]),
        get_task("conll2003"),
        _tokenizer(merged_dir),
        {"train": _rows(8), "validation": _rows(4)},
    )
    dm.setup()
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((batch["labels"] != -100).sum())
    assert nll / count == pytest.approx(result["after"]["val_loss"], abs=2e-3)


def _tokenizer(path):
    from lightning_qlora import load_tokenizer

    return load_tokenizer(str(path))


def test_one_file_in_the_public_schema_holds_out_validation(tmp_path):
    path = tmp_path / "conll.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(10)))
    data = OmegaConf.create({"path": str(path), "val_fraction": 0.2, "dataset": None})
    splits, source = load_splits(data, get_task("conll2003"), seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (8, 2)
    assert "20% for validation held out of train by seed 0" in source
