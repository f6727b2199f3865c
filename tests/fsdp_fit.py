"""Launched by tests/test_fsdp.py: a 2-process CPU fit (gloo) with FSDP-QLoRA or DDP.

usage: python tests/fsdp_fit.py OUT {fsdp|fsdp-bf16|ddp} [RESUME_CKPT]

Lightning's launcher re-runs this script for rank 1, as it would a user's script. Both
strategies see the same model, seed and per-rank batches, so FSDP must train the adapters
DDP trains. Rank 0 writes what it saw at the start of the fit to OUT/start.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin  # noqa: E402
from lightning_qlora.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy, clean_name  # noqa: E402
from tests.conftest import counting_batches, loader, tiny_llama_config  # noqa: E402


class StartProbe(L.Callback):
    """Rank 0's trainable weights and optimizer step count as the fit starts (after any resume)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        steps = [int(s["step"]) for s in trainer.optimizers[0].state.values() if "step" in s]
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True):
            state = {clean_name(n): p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        if trainer.is_global_zero:
            torch.save({"state": state, "optimizer_steps": steps, "global_step": trainer.global_step}, self.out)


def main(out: Path, mode: str, resume: str | None) -> None:
    L.seed_everything(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    if mode.startswith("fsdp"):
        # fsdp: storage "auto" (fp32 on CPU); fsdp-bf16: the storage a GPU run uses.
        strategy, plugin = QLoRAFSDPStrategy(), QLoRAFSDPPlugin(quant_storage="bf16" if mode == "fsdp-bf16" else "auto")
    else:
        strategy, plugin = "ddp", QLoRAPlugin()
    callbacks = [LoRAAdapters(r=4, alpha=8, dropout=0.0, export_dir=out / "adapter")]
    if resume and mode.startswith("fsdp"):
        callbacks.append(StartProbe(out / "start.pt"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        plugins=[plugin],
        callbacks=callbacks,
        max_steps=8 if resume else 6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Each rank gets different batches (a different seed per rank), as a distributed sampler would give.
    batches = counting_batches(8, batch_size=4, seed=1 + trainer.global_rank)
    trainer.fit(CausalLMModule(model, lr=1e-2, warmup_steps=0), loader(batches), ckpt_path=resume)
    trainer.save_checkpoint(out / "last.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
