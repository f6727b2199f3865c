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
    module = SequenceClassificationModule(model, num_labels=3, lr=1e-2, warmup_steps=0)
    trainer = quiet_trainer(plugins=[QLoRAPlugin()], max_epochs=4)
    val = loader(_batches(2, seed=9))
    before = trainer.validate(module, val, verbose=False)[0]
    trainer.fit(module, loader(_batches(10, seed=1)), val)
    after = trainer.validate(module, val, verbose=False)[0]
    assert after["val_loss"] < before["val_loss"]
    assert after["val_acc"] > before["val_acc"]
    assert 0 <= after["val_macro_f1"] <= 1
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("score.modules_to_save") for n in trainable)
    confusion = module.confusion["val"]
    assert confusion.shape == (3, 3) and int(confusion.sum()) == 16


def test_bad_label_arguments():
    with pytest.raises(ValueError, match="num_labels=1 should be at least 2"):
        SequenceClassificationModule("x", num_labels=1)
    with pytest.raises(ValueError, match="label_names has 2 names for num_labels=3"):
        SequenceClassificationModule("x", num_labels=3, label_names=("a", "b"))
