"""Launched by tests/lightning/test_fsdp.py: a 2-process CPU fit (gloo) with FSDP-QLoRA or DDP.

usage: python tests/lightning/fsdp_fit.py OUT {fsdp|fsdp-bf16-lowmem|ddp} [RESUME_CKPT] [BASE_DIR]

Lightning's launcher re-runs this script for rank 1, as it would a user's script. Both
strategies see the same model, seed and per-rank batches, so FSDP must train the adapters
DDP trains. Rank 0 writes what it saw at the start of the fit to OUT/start.pt; each rank
writes its RNG state at the save (OUT/rng_saved{rank}.pt) and, resumed, at its first
backward (OUT/rng_resumed{rank}.pt). fsdp-bf16-lowmem loads BASE_DIR quantizing while
loading, computes in bf16 with storage "auto", and validates.

Every FSDP gather of this run is recorded: a unit holding frozen weights (the 4-bit base)
must never be gathered whole, so OUT/gathered{rank}.txt must stay empty.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin  # noqa: E402
from lightning_qlora.lightning.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy, clean_name, summon_trainable  # noqa: E402
from tests.conftest import counting_batches, loader, tiny_llama_config  # noqa: E402


class RankSeed(L.Callback):
    """Give each rank its own RNG stream (Lightning's setup seeds them all alike), which a resume
    must give back to that rank; a resumed run restores the saved streams after this."""

    def on_train_start(self, trainer, pl_module) -> None:
        torch.manual_seed(100 + trainer.global_rank)


class RNGProbe(L.Callback):
    """Each rank's torch RNG state at its first backward (after a resume has restored it)."""

    def __init__(self, out: Path) -> None:
        self.out, self.done = out, False

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not self.done:
            torch.save(torch.get_rng_state(), self.out / f"rng_resumed{trainer.global_rank}.pt")
            self.done = True


def record_gathers(out: Path) -> None:
    """Wrap FSDP.summon_full_params so that gathering a unit with frozen weights is written down."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lightning_qlora.lightning.fsdp import _own_parameters

    original = FSDP.summon_full_params

    def spy(module, recurse=True, **kwargs):
        units = FSDP.fsdp_modules(module) if recurse else [module]
        frozen = sum(p.numel() for u in units for p in _own_parameters(u) if not p.requires_grad)
        if frozen:
            rank = torch.distributed.get_rank()
            with open(out / f"gathered{rank}.txt", "a") as f:
                f.write(f"{type(module.module).__name__} recurse={recurse}: {frozen} frozen elements\n")
        return original(module, recurse=recurse, **kwargs)

    FSDP.summon_full_params = staticmethod(spy)


class StartProbe(L.Callback):
    """Rank 0's trainable weights and optimizer step count as the fit starts (after any resume)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        steps = [int(s["step"]) for s in trainer.optimizers[0].state.values() if "step" in s]
        with summon_trainable(trainer.strategy.model, writeback=False, rank0_only=True):
            state = {clean_name(n): p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        if trainer.is_global_zero:
            torch.save({"state": state, "optimizer_steps": steps, "global_step": trainer.global_step}, self.out)


def main(out: Path, mode: str, resume: str | None, base: str | None) -> None:
    L.seed_everything(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    lowmem = mode == "fsdp-bf16-lowmem"
    if lowmem:
        # What a GPU run does: storage "auto" resolves to the bf16 compute dtype, and the base is
        # quantized while loading, inside configure_model, before convert_module runs.
        strategy, plugin = QLoRAFSDPStrategy(), QLoRAFSDPPlugin(compute_dtype="bf16")
    elif mode == "fsdp":
        strategy, plugin = QLoRAFSDPStrategy(), QLoRAFSDPPlugin()  # storage "auto": fp32 on CPU
    else:
        strategy, plugin = "ddp", QLoRAPlugin()
    if mode.startswith("fsdp"):
        record_gathers(out)
    callbacks = [LoRAAdapters(r=4, alpha=8, dropout=0.0, export_dir=out / "adapter"), RankSeed()]
    if resume and mode.startswith("fsdp"):
        callbacks += [StartProbe(out / "start.pt"), RNGProbe(out)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        plugins=[plugin],
        callbacks=callbacks,
        max_steps=8 if resume else 6,
        limit_val_batches=2,
        val_check_interval=3 if lowmem else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Each rank gets different batches (a different seed per rank), as a distributed sampler would give.
    batches = counting_batches(8, batch_size=4, seed=1 + trainer.global_rank)
    # The whole loss on both strategies: "auto" chunks it under DDP only, and chunks sum in another
    # order, while the test compares DDP and FSDP bit for bit.
    module = CausalLMModule(base if lowmem else model, lr=1e-2, warmup_steps=0, low_memory=lowmem, loss_chunk_size=None)
    val = loader(counting_batches(2, batch_size=4, seed=9)) if lowmem else None
    trainer.fit(module, loader(batches), val, ckpt_path=resume)
    torch.save(torch.get_rng_state(), out / f"rng_saved{trainer.global_rank}.pt")
    trainer.save_checkpoint(out / "last.ckpt")


if __name__ == "__main__":
    args = sys.argv[1:] + [""] * 4
    main(Path(args[0]), args[1], args[2] or None, args[3] or None)
