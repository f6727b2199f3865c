"""``CausalLMModule``: a LightningModule around any ``AutoModelForCausalLM``."""

from __future__ import annotations

import inspect
import os

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_qlora.metrics import TokenMetrics, answer_positions, shifted_token_stats, token_stats
from lightning_qlora.models import DEFAULT_MODEL, load_model
from lightning_qlora.optim import build_optimizer, check_optim_args, warmup_cosine


class CausalLMModule(L.LightningModule):
    """Fine-tune a causal language model on batches of ``input_ids``, ``attention_mask``, ``labels``.

    Labels are aligned with the inputs, ``-100`` where no loss is taken (the prompt, padding).
    Logs ``train_loss``; and ``val_loss``, ``val_ppl``, ``val_token_acc`` (likewise ``test_*``).

    Args:
        model: A transformers model, or a name/path to load in ``configure_model``
            (the embedded default, a local directory, or a hub id).
        lr: Peak learning rate (QLoRA used 2e-4 for small models).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay.
        min_lr_ratio: Final LR as a fraction of ``lr``.
        optimizer: ``"adamw"``, or ``"paged_adamw_8bit"`` (CUDA only).
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike = DEFAULT_MODEL,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        optimizer: str = "adamw",
    ) -> None:
        super().__init__()
        check_optim_args(optimizer, lr, weight_decay, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model: nn.Module | None = model.train() if isinstance(model, nn.Module) else None
        self._model_name = None if isinstance(model, nn.Module) else str(model)
        self._keeps_logits: bool | None = None
        self.val_metrics = TokenMetrics()
        self.test_metrics = TokenMetrics()

    @override
    def configure_model(self) -> None:
        # Loading here (not in __init__) keeps Trainer/strategy setup cheap and lets every
        # DDP rank load its own copy, which QLoRAPlugin then quantizes on that rank's device.
        if self.model is None:
            self.model = load_model(self._model_name, task="causal-lm")
            # from_pretrained returns eval mode, and Lightning keeps submodule modes as
            # found, which would silently disable LoRA dropout during training.
            self.model.train()

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _stats(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        if self._keeps_logits is None:
            self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if not self._keeps_logits:
            return shifted_token_stats(self(batch["input_ids"], batch.get("attention_mask")), labels)
        # The head only runs where a loss is taken: prompts are masked, and with a 49k
        # vocabulary the head is a fifth of the forward FLOPs of a 135M model.
        keep = answer_positions(labels)
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        return token_stats(logits, labels[:, 1:][:, keep])

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, _, count = self._stats(batch)
        loss = nll / count.clamp(min=1)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_metrics.update(*self._stats(batch))

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.test_metrics.update(*self._stats(batch))

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metric: TokenMetrics) -> None:
        values = metric.compute()
        self.log_dict({f"{stage}_{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=False)
        metric.reset()

    @override
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, hp.optimizer, hp.lr, hp.weight_decay, self.device)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = warmup_cosine(total, hp.warmup_steps, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
