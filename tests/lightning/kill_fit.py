"""Launched by tests/lightning/test_kill.py: a run on the default path that the test kills with SIGKILL.

The default path: gradient checkpointing on, LoRA dropout > 0, the CPU fast path's recompute reuse
(replayed dropout masks), with ``cpu_fast_dropout`` on or off. The run is laid out as ``app/train.py``
lays it out (``OUT/checkpoints/last.ckpt`` every step, ``OUT/adapter``) and starts as ``run()`` starts:
it locks OUT, resolves ``resume=last``, and removes what a killed write left behind.

    kill_fit.py OUT --fast-dropout 0|1 [--kill PHASE:STEP[:FRACTION] --marker FILE] [--resume] [--reference DIR]

``--kill``: at step STEP's PHASE (``forward``, ``backward``, ``optimizer``; or ``write``: after
FRACTION of step STEP's checkpoint bytes are on disk), the run writes FILE and waits to be killed.
That hook lives here, in the test's child, not in the library. ``--reference DIR``: afterwards, an
uninterrupted run of the same config into DIR, in this same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_qlora import CausalLMModule, CPUOptions, LoRAAdapters, QLoRAPlugin  # noqa: E402
from lightning_qlora.app.train import resolve_resume  # noqa: E402
from lightning_qlora.lightning.checkpoint import AtomicCheckpointIO  # noqa: E402
from lightning_qlora.lightning.faults import FaultGuard  # noqa: E402
from lightning_qlora.lightning.lock import OutputDirLock, remove_interrupted_writes  # noqa: E402
from lightning_qlora.tasks.data import PromptAnswerDataModule  # noqa: E402
from tests.conftest import tiny_llama_config  # noqa: E402
from tests.tasks.data.test_formatting import CharTokenizer  # noqa: E402

MAX_STEPS = 6  # 20 rows at batch 4: 5 batches an epoch, so the run crosses an epoch boundary
ROWS = [{"p": f"add {a} and {b}", "a": str(a + b)} for a in range(5) for b in range(5)]


def _wait_to_be_killed(marker: Path, what: str) -> None:
    marker.write_text(what)
    time.sleep(600)  # the test sends SIGKILL now
    raise SystemExit(f"kill_fit: nobody killed this run at {what}")


class KillPoint(L.Callback):
    """Stops the run at one step's forward, backward or optimizer step, for the test to kill it there."""

    def __init__(self, phase: str, step: int, marker: Path) -> None:
        self.phase, self.step, self.marker = phase, step, marker

    def _at(self, trainer: L.Trainer, phase: str) -> None:
        if phase == self.phase and trainer.global_step + 1 == self.step:
            _wait_to_be_killed(self.marker, f"{phase} of step {self.step}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._at(trainer, "forward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._at(trainer, "backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._at(trainer, "optimizer")


def kill_during_write(step: int, fraction: float, marker: Path) -> None:
    """Patch ``torch.save`` (in this process) to stop inside step ``step``'s checkpoint write."""
    real_save = torch.save

    class Partial:
        def __init__(self, f, limit: int) -> None:
            self.f, self.limit, self.written = f, limit, 0

        def write(self, data) -> int:
            data = bytes(data)
            if self.written + len(data) >= self.limit:
                self.f.write(data[: self.limit - self.written])
                self.f.flush()  # in the kernel's hands: a SIGKILL leaves these bytes in the file
                _wait_to_be_killed(marker, f"write of step {step}'s checkpoint, byte {self.limit}")
            self.written += len(data)
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == step and not isinstance(f, (str, os.PathLike)):
            size = (Path(marker).parent / "ckpt_size").read_text()  # a previous checkpoint's size
            f = Partial(f, max(1, int(int(size) * fraction)))
        real_save(obj, f, *args, **kwargs)

    torch.save = save


class RecordSize(L.Callback):
    """At each batch's end, before that batch's save (checkpoint callbacks run last), writes the size of
    the last.ckpt there is, for ``kill_during_write`` to pick a byte inside the next write."""

    def __init__(self, out: Path, marker: Path) -> None:
        self.out, self.marker = out, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = self.out / "checkpoints" / "last.ckpt"
        if last.is_file():
            (self.marker.parent / "ckpt_size").write_text(str(last.stat().st_size))


def fit(out: Path, fast_dropout: bool, resume: bool, extra: list[L.Callback]) -> int:
    """One run into ``out`` as ``app/train.py`` starts and lays it out; returns the step it resumed at."""
    with OutputDirLock(out):
        remove_interrupted_writes(out)
        ckpt = resolve_resume("last" if resume else None, out)
        L.seed_everything(0, verbose=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=256, max_position_embeddings=128))
        module = CausalLMModule(model, lr=5e-3, warmup_steps=2)
        splits = {"train": ROWS[:20], "validation": ROWS[20:]}
        data = PromptAnswerDataModule(CharTokenizer(), splits, lambda r: (r["p"], r["a"]), max_length=32, batch_size=4)
        checkpoints = ModelCheckpoint(
            dirpath=out / "checkpoints",
            filename="step={step}",
            every_n_train_steps=1,
            save_top_k=0,
            save_last=True,
            save_on_train_epoch_end=False,
        )
        # The default adapter path: gradient checkpointing on, dropout > 0, recompute reuse on.
        adapters = LoRAAdapters(r=4, alpha=8, dropout=0.1, gradient_checkpointing=True, export_dir=out / "adapter")
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=MAX_STEPS,
            plugins=[QLoRAPlugin(cpu=CPUOptions(fast_dropout=fast_dropout)), AtomicCheckpointIO()],
            callbacks=[adapters, FaultGuard(out / "checkpoints"), *extra, checkpoints],
            logger=False,
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        start = torch.load(ckpt, weights_only=True)["global_step"] if ckpt is not None else 0
        trainer.fit(module, data, ckpt_path=ckpt, weights_only=True)
        assert trainer.global_step == MAX_STEPS, trainer.global_step
        return start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fast-dropout", type=int, choices=(0, 1), required=True)
    parser.add_argument("--kill")
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same in every process of a test, so that their arithmetic is the same
    extra: list[L.Callback] = []
    if args.kill:
        phase, step, *fraction = args.kill.split(":")
        extra.append(RecordSize(args.out, args.marker))
        if phase == "write":
            kill_during_write(int(step), float(fraction[0]), args.marker)
        else:
            extra.append(KillPoint(phase, int(step), args.marker))
    start = fit(args.out, bool(args.fast_dropout), args.resume, extra)
    print(f"kill_fit: trained steps {start + 1}..{MAX_STEPS}", flush=True)
    if args.reference is not None:
        fit(args.reference, bool(args.fast_dropout), False, [])


if __name__ == "__main__":
    main()
