import pytest
import torch
from transformers import LlamaForSequenceClassification

from lightning_qlora import QLoRAPlugin
from lightning_qlora.tasks import SequenceClassificationModule
from tests.conftest import loader, quiet_trainer, tiny_llama_config


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 3, (8,), generator=g)
        # The class is written in the first token: learnable by the head and adapters.
        ids = torch.randint(3, 64, (8, 12), generator=g)
        ids[:, 0] = labels + 3
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_head_trains_fully_and_metrics_include_confusion():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=3))
    module = SequenceClassificationModule(model, num_labels=3, label_names=("Neg", "Neu", "Sci/Tech"), lr=1e-2)
    trainer = quiet_trainer(plugins=[QLoRAPlugin()], max_epochs=4)
    val = loader(_batches(2, seed=9))
    before = trainer.validate(module, val, verbose=False)[0]
    trainer.fit(module, loader(_batches(10, seed=1)), val)
    after = trainer.validate(module, val, verbose=False)[0]
    assert after["val_loss"] < before["val_loss"]
    assert after["val_acc"] > before["val_acc"]
    # Every score by hand from the module's own predictions: accuracy, per-class F1 = 2TP / (2TP + FP + FN),
    # and macro-F1 their mean.
    module.eval()
    with torch.no_grad():
        predicted = [(module(b["input_ids"]).argmax(-1).tolist(), b["labels"].tolist()) for b in val]
    pairs = [pair for p, t in predicted for pair in zip(p, t, strict=True)]
    f1 = []
    for k in range(3):
        tp = sum(p == t == k for p, t in pairs)
        wrong = sum((p == k) != (t == k) for p, t in pairs)
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    assert after["val_acc"] == pytest.approx(sum(p == t for p, t in pairs) / len(pairs), abs=1e-6)
    assert [after[f"val_f1_{k}"] for k in ("neg", "neu", "sci_tech")] == pytest.approx(f1, abs=1e-6)
    assert after["val_macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-6)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("score.modules_to_save") for n in trainable)
    confusion = module.confusion["val"]
    assert confusion.shape == (3, 3) and int(confusion.sum()) == 16


def test_bad_label_arguments():
    with pytest.raises(ValueError, match="num_labels=1 should be at least 2"):
        SequenceClassificationModule("x", num_labels=1)
    with pytest.raises(ValueError, match="label_names has 2 names for num_labels=3"):
        SequenceClassificationModule("x", num_labels=3, label_names=("a", "b"))
