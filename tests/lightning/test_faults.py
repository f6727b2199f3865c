"""Numerical faults: a NaN loss stops before the update (or is skipped, a bounded number of times)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.lightning.faults import FaultGuard, NonFiniteLossError
from tests.conftest import counting_batches, loader, quiet_trainer, tiny_llama_config

ROOT = Path(__file__).resolve().parents[2]


class PoisonedAt(CausalLMModule):
    """Training loss is NaN (or ``bad_value``) at the given batches, as an fp16 overflow or a bad batch makes it."""

    def __init__(self, model, bad: set[int], bad_value: float = float("nan"), **optim) -> None:
        super().__init__(model, **{"lr": 1e-2, "warmup_steps": 0, **optim})
        self.bad, self.bad_value = bad, bad_value
        self.lora_before_bad: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx in self.bad:
            self.lora_before_bad = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
            return loss * self.bad_value
        return loss


class StepProbe(L.Callback):
    """What a skipped step at batch ``at`` changed: parameters, AdamW moments and steps, LR schedule, RNG.

    Put it after the FaultGuard: it compares the state at the batch's start with the state at its end.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.changed: list[str] | None = None  # None: the batch never ran
        self.compared: list[str] = []
        self._before: dict[str, object] = {}

    @staticmethod
    def state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, object]:
        (optimizer,) = trainer.optimizers
        (config,) = trainer.lr_scheduler_configs
        state: dict[str, object] = {
            "torch rng": torch.get_rng_state(),
            "python rng": random.getstate(),
            "lr": [group["lr"] for group in optimizer.param_groups],
            "scheduler step": config.scheduler.last_epoch,
            "scheduler lr": list(config.scheduler.get_last_lr()),
        }
        for name, param in pl_module.named_parameters():
            if param.requires_grad:
                state[name] = param.detach().clone()
                for key, value in optimizer.state.get(param, {}).items():  # exp_avg, exp_avg_sq, step
                    state[f"{name} {key}"] = value.detach().clone()
        return state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            self._before = self.state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != self.at:
            return
        after, before = self.state(trainer, pl_module), self._before
        self.compared = sorted(before)
        self.changed = sorted(key for key in after.keys() | before.keys() if not _same(after.get(key), before.get(key)))


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


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


# dropout > 0 with gradient checkpointing (the default path: replayed masks), so the RNG matters;
# warmup, so the LR schedule matters (min_lr_ratio=1: no cosine, whose length is max_steps); weight
# decay, so a zero gradient instead of none would still move the weights.
OPTIM = dict(lr=1e-2, warmup_steps=3, min_lr_ratio=1.0, weight_decay=0.1)


def _skip_fit(module, batches, steps, callbacks):
    torch.manual_seed(0)  # the same dropout masks from the first step on
    adapters = LoRAAdapters(r=4, dropout=0.1, gradient_checkpointing=True)
    trainer = quiet_trainer(plugins=[QLoRAPlugin()], callbacks=[adapters, *callbacks], max_steps=steps)
    trainer.fit(module, loader(batches))
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _tiny():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture(scope="module")
def without_the_bad_batch():
    batches = counting_batches(5)
    return _skip_fit(PoisonedAt(_tiny(), bad=set(), **OPTIM), [batches[i] for i in (0, 1, 3, 4)], 4, [])


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_skipped_step_changes_nothing(bad_value, without_the_bad_batch, tmp_path):
    """The skipped step leaves weights, moments, schedule and RNG as it found them, so the run ends
    where a run without that batch ends."""
    probe, guard = StepProbe(at=2), FaultGuard(tmp_path / "checkpoints", max_skipped_steps=1)
    module = PoisonedAt(_tiny(), bad={2}, bad_value=bad_value, **OPTIM)
    final = _skip_fit(module, counting_batches(5), 5, [guard, probe])
    assert guard.skipped == [3]
    # 28 adapter tensors, each with its AdamW exp_avg, exp_avg_sq and step (two steps were taken before).
    moments = [key for key in probe.compared if key.endswith((".weight exp_avg", ".weight exp_avg_sq", ".weight step"))]
    assert len(moments) == 3 * 28
    assert probe.changed == [], f"the skipped step changed {probe.changed[:6]}"
    assert final.keys() == without_the_bad_batch.keys()
    for name, value in without_the_bad_batch.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)


def test_under_ddp_all_ranks_skip_when_one_rank_sees_nan(tmp_path):
    """2 CPU processes (gloo): rank 1 alone gets a NaN loss at batch 1; both ranks skip that step."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lightning" / "ddp_skip_fit.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank, got in enumerate(ranks):
        assert got["skipped"] == [2], (rank, got["skipped"])
        assert sum(key.endswith(" exp_avg_sq") for key in got["compared"]) == 28, rank
        assert got["changed"] == [], (rank, got["changed"][:6])
    assert ranks[0]["lora"].keys() == ranks[1]["lora"].keys() and len(ranks[0]["lora"]) == 28
    for name, value in ranks[0]["lora"].items():
        torch.testing.assert_close(ranks[1]["lora"][name], value, rtol=0, atol=0, msg=name)
