"""Numerical faults: a NaN loss stops before the update (or is skipped, a bounded number of times)."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.lightning.faults import FaultGuard, NonFiniteLossError
from tests.conftest import counting_batches, loader, quiet_trainer


class PoisonedAt(CausalLMModule):
    """Training loss is NaN at the given batches, as an fp16 overflow or a bad batch would make it."""

    def __init__(self, model, bad: set[int]) -> None:
        super().__init__(model, lr=1e-2, warmup_steps=0)
        self.bad = bad
        self.lora_before_bad: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx in self.bad:
            self.lora_before_bad = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
            return loss * float("nan")
        return loss


def _fit(model, guard, steps=6):
    adapters = LoRAAdapters(r=4, dropout=0.0, gradient_checkpointing=False)
    return quiet_trainer(plugins=[QLoRAPlugin()], callbacks=[adapters, guard], max_steps=steps)


def test_nan_loss_stops_before_the_update_naming_step_and_batch(tiny_llama, tmp_path):
    module = PoisonedAt(tiny_llama, bad={3})
    guard = FaultGuard(tmp_path / "checkpoints")
    trainer = _fit(tiny_llama, guard)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 \(epoch 0, batch 3\).*weights are intact"):
        trainer.fit(module, loader(counting_batches(6)))
    after = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert module.lora_before_bad and all(torch.equal(after[n], v) for n, v in module.lora_before_bad.items())


def test_bounded_skips_keep_the_weights_finite(tiny_llama, tmp_path):
    module = PoisonedAt(tiny_llama, bad={2, 4})
    guard = FaultGuard(tmp_path / "checkpoints", max_skipped_steps=2)
    _fit(tiny_llama, guard).fit(module, loader(counting_batches(6)))
    assert guard.skipped == [3, 5]
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)
    # A third bad step is one too many.
    module = PoisonedAt(tiny_llama.__class__(tiny_llama.config), bad={1, 2, 3})
    with pytest.raises(NonFiniteLossError, match="step 4"):
        _fit(module.model, FaultGuard(max_skipped_steps=2)).fit(module, loader(counting_batches(6)))


def test_bad_skip_budget():
    with pytest.raises(ValueError, match="max_skipped_steps=-1 should be an integer >= 0"):
        FaultGuard(max_skipped_steps=-1)
