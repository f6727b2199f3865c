"""``SequenceClassificationModule``: a classification head on a (quantized) language model."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from typing_extensions import override

from lightning_qlora.io.models import DEFAULT_MODEL, check_low_memory, load_model, low_memory_args
from lightning_qlora.tasks.heads import HeadModule
from lightning_qlora.tasks.metrics import reset_outside_inference
from lightning_qlora.tasks.optim import check_optim_args


def _metric_key(name: str) -> str:
    """A class name as a metric-name suffix: ``Sci/Tech`` -> ``sci_tech``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "class"


class SequenceClassificationModule(HeadModule):
    """Fine-tune ``AutoModelForSequenceClassification``: QLoRA on the body, the head trained fully.

    Batches hold ``input_ids``, ``attention_mask`` and integer ``labels`` (one per row).
    Logs ``train_loss``; ``val_loss``, ``val_acc``, ``val_macro_f1``, and ``val_f1_<class>`` for each
    class (likewise ``test_*``);
    the last confusion matrix of each stage is kept in ``confusion[stage]`` (rows: truth).

    Args:
        model: A transformers sequence-classification model, or a name/path to load.
        num_labels: Number of classes.
        label_names: Optional class names, for reports.
        lr, weight_decay, warmup_steps, min_lr_ratio, optimizer, low_memory: as in ``CausalLMModule``.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike = DEFAULT_MODEL,
        num_labels: int = 2,
        label_names: Sequence[str] = (),
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        optimizer: str = "adamw",
        low_memory: bool | str = "auto",
    ) -> None:
        super().__init__()
        # Checkpoints hold only the adapters; QLoRAPlugin checks and loads them once they exist.
        self.strict_loading = False
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels} should be at least 2.")
        if label_names and len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} names for num_labels={num_labels}.")
        check_optim_args(optimizer, lr, weight_decay, warmup_steps, min_lr_ratio)
        check_low_memory(low_memory)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model: nn.Module | None = model.train() if isinstance(model, nn.Module) else None
        self._model_name = None if isinstance(model, nn.Module) else str(model)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_labels, average="micro"),
                "macro_f1": MulticlassF1Score(num_labels, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        # Per-class F1 (the minority classes' scores are what a majority-class model gets wrong).
        self.val_class_f1 = MulticlassF1Score(num_labels, average=None)
        self.test_class_f1 = MulticlassF1Score(num_labels, average=None)
        self._class_keys = [_metric_key(n) for n in (label_names or map(str, range(num_labels)))]
        self.val_confusion = MulticlassConfusionMatrix(num_labels)
        self.test_confusion = MulticlassConfusionMatrix(num_labels)
        self.confusion: dict[str, torch.Tensor] = {}

    @override
    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_model(
                self._model_name,
                task="sequence-classification",
                num_labels=self.hparams.num_labels,
                **low_memory_args(self),
            )
            self.model.train()  # from_pretrained returns eval mode; see CausalLMModule

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask")).float()
        return nn.functional.cross_entropy(logits, batch["labels"]), logits

    def _stage_metrics(self, stage: str) -> tuple[MetricCollection, MulticlassF1Score, MulticlassConfusionMatrix]:
        if stage == "val":
            return self.val_metrics, self.val_class_f1, self.val_confusion
        return self.test_metrics, self.test_class_f1, self.test_confusion

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, logits = self._loss(batch)
        for metric in self._stage_metrics(stage):
            metric.update(logits, batch["labels"])
        self.log(f"{stage}_loss", loss, batch_size=batch["labels"].size(0), sync_dist=True)

    def _eval_end(self, stage: str) -> None:
        metrics, class_f1, confusion = self._stage_metrics(stage)
        self.log_dict(metrics.compute(), prog_bar=stage == "val")
        per_class = class_f1.compute()
        self.log_dict({f"{stage}_f1_{key}": f1 for key, f1 in zip(self._class_keys, per_class, strict=True)})
        self.confusion[stage] = confusion.compute().clone().cpu()
        reset_outside_inference(metrics, class_f1, confusion)
