"""``CausalLMModule``: a LightningModule around any ``AutoModelForCausalLM``."""

from __future__ import annotations

import inspect
import os

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_qlora.io.models import DEFAULT_MODEL, check_low_memory, load_model, low_memory_args
from lightning_qlora.tasks.chunked_loss import (
    check_chunk_size,
    chunked_token_nll,
    hidden_at_head,
    output_head,
    resolve_chunk_size,
)
from lightning_qlora.tasks.metrics import (
    TokenMetrics,
    answer_positions,
    reset_outside_inference,
    token_nll,
    token_stats,
)
from lightning_qlora.tasks.optim import check_optim_args, configure_optimizers


@torch.no_grad()
def option_scores(model: nn.Module, prompt_ids: torch.Tensor, options: list[list[int]]) -> torch.Tensor:
    """Mean log-likelihood per token of each option after the prompt (batch of one prompt).

    The prompt runs once; its KV cache is repeated for the options, so scoring K options
    costs one prompt pass plus K short passes.
    """
    out = model(input_ids=prompt_ids, use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1)
    # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning).
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(out, cache_kw)
    cache.batch_repeat_interleave(len(options))
    width = max(len(o) for o in options)
    ids = torch.zeros((len(options), width), dtype=torch.long, device=prompt_ids.device)
    mask = torch.zeros((len(options), prompt_ids.size(1) + width), dtype=torch.long, device=prompt_ids.device)
    mask[:, : prompt_ids.size(1)] = 1
    for k, option in enumerate(options):
        ids[k, : len(option)] = torch.tensor(option, device=prompt_ids.device)
        mask[k, prompt_ids.size(1) : prompt_ids.size(1) + len(option)] = 1
    positions = torch.arange(prompt_ids.size(1), prompt_ids.size(1) + width, device=prompt_ids.device)
    step = model(
        input_ids=ids, attention_mask=mask, position_ids=positions.expand(len(options), -1), **{cache_kw: cache}
    )
    logprobs = step.logits.float().log_softmax(-1)
    scores = []
    for k, option in enumerate(options):
        total = first[option[0]] + sum(logprobs[k, j - 1, option[j]] for j in range(1, len(option)))
        scores.append(total / len(option))
    return torch.stack(scores)


class CausalLMModule(L.LightningModule):
    """Fine-tune a causal language model on batches of ``input_ids``, ``attention_mask``, ``labels``.

    Labels are aligned with the inputs, ``-100`` where no loss is taken (the prompt, padding).
    Logs ``train_loss``; and ``val_loss``, ``val_ppl``, ``val_token_acc`` (likewise ``test_*``),
    plus ``val_choice_acc`` when batches carry answer options (``choice_ids``, ``choice_label``,
    ``answer_start``): the share of rows whose right option is the most likely one.

    Args:
        model: A transformers model, or a name/path to load in ``configure_model``
            (the embedded default, a local directory, or a hub id).
        lr: Peak learning rate (QLoRA used 2e-4 for small models).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay.
        min_lr_ratio: Final LR as a fraction of ``lr``.
        optimizer: ``"adamw"``, or ``"paged_adamw_8bit"`` (CUDA only).
        low_memory: Quantize while loading ``model`` (a path), so the 16/32-bit model is never
            in host memory at once; needs QLoRAPlugin. ``"auto"`` does so unless the plugin needs
            the unquantized weights (``keep_high_precision``, LoftQ) or the model has no safetensors.
        loss_chunk_size: Training loss over this many scored tokens at a time, so the full
            logits never exist (``tasks.chunked_loss``); ``None``: all at once; ``"auto"``
            (default): chunks of 1024 where the head allows it (a float Linear, not sharded).
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike = DEFAULT_MODEL,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        optimizer: str = "adamw",
        low_memory: bool | str = "auto",
        loss_chunk_size: int | str | None = "auto",
    ) -> None:
        super().__init__()
        # Checkpoints hold only the adapters; QLoRAPlugin checks and loads them once they exist.
        self.strict_loading = False
        check_optim_args(optimizer, lr, weight_decay, warmup_steps, min_lr_ratio)
        check_low_memory(low_memory)
        check_chunk_size(loss_chunk_size)
        self.loss_chunk_size = loss_chunk_size
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model: nn.Module | None = model.train() if isinstance(model, nn.Module) else None
        self._model_name = None if isinstance(model, nn.Module) else str(model)
        self._keeps_logits: bool | None = None
        self.val_metrics = TokenMetrics()
        self.test_metrics = TokenMetrics()
        # Accuracy of the option (e.g. yes/no/maybe, A-E) the model finds most likely.
        self.val_choice_acc = MeanMetric()
        self.test_choice_acc = MeanMetric()

    @override
    def configure_model(self) -> None:
        # Loading here (not in __init__) keeps Trainer/strategy setup cheap and lets every
        # DDP rank load its own copy, which QLoRAPlugin then quantizes on that rank's device.
        if self.model is None:
            self.model = load_model(self._model_name, task="causal-lm", **low_memory_args(self))
            # from_pretrained returns eval mode, and Lightning keeps submodule modes as
            # found, which would silently disable LoRA dropout during training.
            self.model.train()

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _forward_scored(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits where a loss is taken, their targets, and the kept positions (None: all)."""
        labels = batch["labels"]
        if self._keeps_logits is None:
            self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if not self._keeps_logits:
            logits = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"),
                use_cache=False,
            ).logits
            return logits[:, :-1], labels[:, 1:], None
        # The head only runs where a loss is taken: prompts are masked, and with a 49k
        # vocabulary the head is a fifth of the forward FLOPs of a 135M model.
        keep = answer_positions(labels)
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),  # packed rows restart positions per example
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        return logits, labels[:, 1:][:, keep], keep

    def _stats(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, target, _ = self._forward_scored(batch)
        return token_stats(logits, target)

    def _loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL and scored tokens of a batch: ``_stats`` without the accuracy's argmax pass."""
        chunk = resolve_chunk_size(self.model, self.loss_chunk_size, sharded=self._sharded())
        if chunk is None:
            logits, target, _ = self._forward_scored(batch)
            return token_nll(logits, target)
        head = output_head(self.model)
        with hidden_at_head(head) as seen:
            _, target, _ = self._forward_scored(batch)  # the head saw zero positions
        hidden = seen[-1]
        if hidden.size(-2) == target.size(-1) + 1:  # a model without logits_to_keep: every position
            hidden = hidden[..., :-1, :]
        return chunked_token_nll(hidden, head, target, chunk)

    def _sharded(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        strategy = getattr(self._trainer, "strategy", None)
        return isinstance(strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, count = self._loss_sums(batch)
        loss = nll / count.clamp(min=1)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: TokenMetrics, choice: MeanMetric) -> None:
        logits, target, keep = self._forward_scored(batch)
        metrics.update(*token_stats(logits, target))
        if "choice_ids" in batch:
            # Score each option by the likelihood of its first token where the answer begins.
            position = batch["answer_start"] - 1
            column = position if keep is None else torch.searchsorted(keep, position)
            rows = torch.arange(logits.size(0), device=logits.device)
            first = logits[rows, column]  # (batch, vocab)
            scores = first.gather(1, batch["choice_ids"])
            choice.update((scores.argmax(-1) == batch["choice_label"]).float())
        elif "choice_seqs" in batch:
            preds = [
                option_scores(self.model, batch["input_ids"][b : b + 1, :start], options).argmax()
                for b, (start, options) in enumerate(
                    zip(batch["answer_start"].tolist(), batch["choice_seqs"], strict=True)
                )
            ]
            choice.update((torch.stack(preds) == batch["choice_label"]).float())

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_choice_acc)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics, self.val_choice_acc)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_choice_acc)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics, self.test_choice_acc)

    def _log_metrics(self, stage: str, metric: TokenMetrics, choice: MeanMetric) -> None:
        values = {f"{stage}_{k}": v for k, v in metric.compute().items()}
        if choice.update_called:
            values[f"{stage}_choice_acc"] = choice.compute()
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)
        reset_outside_inference(metric, choice)

    @override
    def configure_optimizers(self):
        return configure_optimizers(self)
