import pytest
import torch
from transformers import LlamaForTokenClassification

from lightning_qlora import QLoRAPlugin
from lightning_qlora.tasks import TokenClassificationModule
from lightning_qlora.tasks.entities import entity_scores
from tests.conftest import loader, quiet_trainer, tiny_llama_config

NAMES = ("O", "B-ENT", "I-ENT")


def _batches(n, seed):
    """Tokens 3-12 are one-token entities (B-ENT), the rest O; every third position is unscored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 40, (8, 12), generator=g)
        labels = (ids < 13).long()
        labels[:, ::3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_head_trains_fully_and_scores_are_entity_level():
    torch.manual_seed(0)
    model = LlamaForTokenClassification(tiny_llama_config(num_labels=3))
    module = TokenClassificationModule(model, label_names=NAMES, lr=1e-2, warmup_steps=0)
    trainer = quiet_trainer(plugins=[QLoRAPlugin()], max_epochs=2)
    val = loader(_batches(2, seed=9))
    before = trainer.validate(module, val, verbose=False)[0]
    trainer.fit(module, loader(_batches(8, seed=1)))
    after = trainer.validate(module, val, verbose=False)[0]
    assert after["val_loss"] < before["val_loss"]
    assert after["val_f1"] > before["val_f1"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("score.modules_to_save") for n in trainable)

    module.eval()
    gold, pred, nll, count = [], [], 0.0, 0
    with torch.no_grad():
        for batch in val:
            logits = module(batch["input_ids"]).float()
            for row_logits, row_labels in zip(logits, batch["labels"], strict=True):
                scored = row_labels != -100
                gold.append([NAMES[t] for t in row_labels[scored].tolist()])
                pred.append([NAMES[t] for t in row_logits[scored].argmax(-1).tolist()])
                # The loss is over scored positions only.
                logp = row_logits[scored].log_softmax(-1)
                nll -= logp.gather(-1, row_labels[scored, None]).sum().item()
                count += int(scored.sum())
    assert after["val_loss"] == pytest.approx(nll / count, abs=1e-4)
    expected = entity_scores(gold, pred)
    for key in ("precision", "recall", "f1", "f1_ENT"):
        assert after[f"val_{key}"] == pytest.approx(expected[key], abs=1e-6)


def test_bad_label_names():
    with pytest.raises(ValueError, match=r"should be distinct IOB tags with O among them \('PER' is not one\)"):
        TokenClassificationModule("x", label_names=("O", "PER"))
    with pytest.raises(ValueError, match="should be distinct IOB tags with O among them, e.g. O, B-PER, I-PER"):
        TokenClassificationModule("x", label_names=("B-PER", "I-PER"))
