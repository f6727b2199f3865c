"""StepValidation counts optimizer steps; ValidatedCheckpoint (see test_best.py's resume) saves after validation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.lightning.validation import StepValidation
from tests.conftest import counting_batches, loader, quiet_trainer, tiny_llama_config


class StepsAtValidation(L.Callback):
    """The optimizer step of each validation during fit, and whether the batch before it ended an accumulation."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.mid_accumulation: list[int] = []
        self._stepped = False
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stepped, self._seen = trainer.global_step != self._seen, trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.steps.append(trainer.global_step)
            if not self._stepped:
                self.mid_accumulation.append(trainer.global_step)


def _validation_steps(every: int, accumulate: int, max_steps: int, batches: int, step_validation: bool = True):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    module = CausalLMModule(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)), lr=1e-3, warmup_steps=0)
    seen = StepsAtValidation()
    callbacks = [LoRAAdapters(r=2, alpha=4, dropout=0.0, gradient_checkpointing=False), seen]
    trainer = quiet_trainer(
        max_steps=max_steps,
        plugins=[QLoRAPlugin()],
        callbacks=[*callbacks, StepValidation(every)] if step_validation else callbacks,
        accumulate_grad_batches=accumulate,
        val_check_interval=every * accumulate,  # in batches, as Lightning counts them
        check_val_every_n_epoch=None,
    )
    trainer.fit(module, loader(counting_batches(batches, batch_size=2)), loader(counting_batches(1, batch_size=2)))
    return seen


def test_validation_counts_optimizer_steps_with_accumulation_across_epochs():
    # 5 batches an epoch, 2 accumulated: optimizer steps end batches 2, 4, 5 | 7, 9, 10 | 12, 14, ...
    # (Lightning steps on an epoch's last, shorter accumulation). Every 2 steps is 2, 4, 6, 8.
    seen = _validation_steps(every=2, accumulate=2, max_steps=8, batches=5)
    assert seen.steps == [2, 4, 6, 8] and seen.mid_accumulation == []
    # Lightning's own count of 2 x 2 = 4 batches validates after batches 4, 8 and 12 (step 8 ends
    # batch 14): steps 2, 4 (mid-accumulation) and 7, off the schedule once an epoch ends short.
    raw = _validation_steps(every=2, accumulate=2, max_steps=8, batches=5, step_validation=False)
    assert raw.steps == [2, 4, 7] and raw.mid_accumulation == [4]


def test_step_validation_needs_validation_by_batch_count():
    from transformers import LlamaForCausalLM

    module = CausalLMModule(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)))
    trainer = quiet_trainer(max_steps=1, plugins=[QLoRAPlugin()], callbacks=[StepValidation(2)])
    with pytest.raises(ValueError, match=r"check_val_every_n_epoch=None\)\.$"):
        trainer.fit(module, loader(counting_batches(2)), loader(counting_batches(1)))
    with pytest.raises(ValueError, match=r"^every_n_steps=0 should be an integer >= 1 \(optimizer steps\)\.$"):
        StepValidation(0)
