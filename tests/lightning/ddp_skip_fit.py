"""Launched by tests/lightning/test_faults.py: a 2-process CPU DDP fit (gloo) where one rank sees a NaN loss.

Rank 1's loss is NaN at batch 1; rank 0's is finite. Each rank saves what it skipped, what the
skipped step changed there (tests.lightning.test_faults.StepProbe) and its final adapter weights.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_qlora import LoRAAdapters, QLoRAPlugin  # noqa: E402
from lightning_qlora.lightning.faults import FaultGuard  # noqa: E402
from tests.conftest import counting_batches, loader, tiny_llama_config  # noqa: E402
from tests.lightning.test_faults import OPTIM, PoisonedAt, StepProbe  # noqa: E402


def main(out: Path) -> None:
    L.seed_everything(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    guard, probe = FaultGuard(max_skipped_steps=1), StepProbe(at=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[QLoRAPlugin()],
        callbacks=[LoRAAdapters(r=4, alpha=8, dropout=0.1), guard, probe],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = counting_batches(3, batch_size=4, seed=1 + trainer.global_rank)
    module = PoisonedAt(model, bad={1} if trainer.global_rank == 1 else set(), **OPTIM)
    trainer.fit(module, loader(batches))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    result = {"skipped": guard.skipped, "changed": probe.changed, "compared": probe.compared, "lora": lora}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
