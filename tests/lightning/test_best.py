"""BestAdapter: the adapter kept, exported and restored is the best validation's, across early stopping and resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from safetensors.torch import load_file

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.lightning.best import BestAdapter, Monitor
from lightning_qlora.lightning.checkpoint import AtomicCheckpointIO
from lightning_qlora.lightning.validation import StepValidation, ValidatedCheckpoint
from tests.conftest import counting_batches, loader, quiet_trainer, tiny_llama_config

# The task metric by global step: up to step 3, then down. Validating every step, with patience 2
# the best is step 3 (neither the first validation nor the last) and the run stops at step 3 + 2.
SCORES = {1: 0.2, 2: 0.6, 3: 0.9, 4: 0.5, 5: 0.4, 6: 0.3, 7: 0.2, 8: 0.1, 9: 0.05, 10: 0.01}


class ScriptedScore(CausalLMModule):
    """A causal LM that trains as usual and also logs ``val_score``, fixed by step (SCORES)."""

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val_score", SCORES.get(self.trainer.global_step, 0.0))


class Snapshots(L.Callback):
    """The test's own copy of the trainable weights at each validation during fit, and at the end of training."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}
        self.last: dict[str, torch.Tensor] = {}

    @staticmethod
    def _copy(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.at[trainer.global_step] = self._copy(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.last = self._copy(pl_module)


def _fit(out, max_steps, ckpt=None, patience=2, every=1, monitor="val_score"):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    module = ScriptedScore(LlamaForCausalLM(tiny_llama_config()), lr=5e-3, warmup_steps=0)
    snapshots, best = Snapshots(), BestAdapter(monitor, "max", export_dir=out / "adapter")
    callbacks = [
        LoRAAdapters(r=4, alpha=8, dropout=0.0, gradient_checkpointing=False, export_dir=out / "adapter-last"),
        best,
        StepValidation(every),
        ValidatedCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_top_k=0, save_last=True),
        snapshots,
    ]
    if patience:
        callbacks.append(EarlyStopping(monitor, patience=patience, mode="max", check_on_train_epoch_end=False))
    trainer = quiet_trainer(
        max_steps=max_steps,
        plugins=[QLoRAPlugin(), AtomicCheckpointIO()],
        callbacks=callbacks,
        enable_checkpointing=True,
        val_check_interval=every,
        check_val_every_n_epoch=None,
    )
    trainer.fit(module, loader(counting_batches(5)), loader(counting_batches(1, seed=1)), ckpt_path=ckpt)
    return trainer, module, best, snapshots


def _exported(directory) -> dict[str, torch.Tensor]:
    """An exported adapter by the module's parameter names: PEFT's file keys drop the wrapper prefix
    and the adapter's name (``model.model.layers.0...lora_A.default.weight`` is saved as
    ``base_model.model.model.layers.0...lora_A.weight``).
    """
    tensors = load_file(directory / "adapter_model.safetensors")
    return {
        "model." + k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
        for k, v in tensors.items()
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


def test_early_stopping_exports_and_restores_the_best_step_adapter(tmp_path):
    trainer, module, best, snapshots = _fit(tmp_path, max_steps=20)
    assert sorted(snapshots.at) == [1, 2, 3, 4, 5]  # stopped after 2 validations without a better score
    assert trainer.global_step == 5 and (best.best_step, best.best_score) == (3, pytest.approx(0.9))
    assert _differ(snapshots.at[3], snapshots.at[5])  # the steps trained: best and last differ
    _assert_same(_exported(tmp_path / "adapter"), snapshots.at[3])
    _assert_same(_exported(tmp_path / "adapter-last"), snapshots.at[5])
    _assert_same(Snapshots._copy(module), snapshots.at[3])  # fit ends holding the adapter exported
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_resume_continues_patience_and_keeps_the_earlier_best(tmp_path):
    # Stopped by max_steps at step 4, one validation after the best: patience has counted 1 of 3.
    _, _, first, snapshots = _fit(tmp_path, max_steps=4, patience=3)
    assert first.best_step == 3
    trainer, module, best, _ = _fit(tmp_path, max_steps=20, ckpt=tmp_path / "ckpt" / "last.ckpt", patience=3)
    # Counted on: steps 5 and 6 are the 2nd and 3rd without improvement. Counting afresh, 5 (0.4)
    # would beat the reset best and the run would go on to step 8.
    assert trainer.global_step == 6
    assert (best.best_step, best.best_score) == (3, pytest.approx(0.9))
    assert [s for s, _ in best.history] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in best.history] == pytest.approx([SCORES[s] for s in range(1, 7)])
    _assert_same(_exported(tmp_path / "adapter"), snapshots.at[3])  # the first run's best, saved by the test
    _assert_same(Snapshots._copy(module), snapshots.at[3])


def test_a_fit_shorter_than_the_interval_exports_the_last(tmp_path):
    trainer, module, best, snapshots = _fit(tmp_path, max_steps=2, every=3, patience=None)
    assert trainer.global_step == 2 and snapshots.at == {} and best.best_step is None
    _assert_same(_exported(tmp_path / "adapter"), snapshots.last)
    _assert_same(_exported(tmp_path / "adapter-last"), snapshots.last)


def test_a_metric_the_task_never_logs_fails_at_the_first_validation_in_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        _fit(tmp_path, max_steps=3, patience=None, monitor="val_nope")
    message = str(err.value)
    assert message.startswith(
        "metric 'val_nope' is not logged by this task's validation, which logs"
        " val_loss, val_ppl, val_score, val_token_acc;"
    )
    assert "\n" not in message


def test_monitor_rules():
    with pytest.raises(ValueError, match="metric should be a validation metric's name, starting with val_, but got"):
        Monitor("acc", "max")
    with pytest.raises(ValueError, match=r"mode='up' is unknown; use one of: max, min\."):
        Monitor("val_acc", "up")
    up, down = Monitor("val_acc", "max"), Monitor("val_loss", "min")
    assert up.improves(0.5, None) and up.improves(0.6, 0.5) and not up.improves(0.5, 0.5)  # a tie keeps the first
    assert down.improves(1.0, 2.0) and not down.improves(2.0, 1.0)
    assert not up.improves(math.nan, None) and not down.improves(math.inf, 1.0)
