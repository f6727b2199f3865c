"""Launched by tests/lightning/test_ddp.py: a 2-process CPU DDP fit (gloo) through QLoRAPlugin.

Lightning's DDP launcher re-runs this script for rank 1, as it would a user's script.
Each rank saves its adapter weights so the test can compare them.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin  # noqa: E402
from tests.conftest import counting_batches, loader, tiny_llama_config  # noqa: E402


def main(out: Path) -> None:
    L.seed_everything(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[QLoRAPlugin()],
        callbacks=[LoRAAdapters(r=4, alpha=8, export_dir=out / "adapter")],
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Each rank gets different batches (a different seed per rank), as a distributed sampler would give.
    batches = counting_batches(6, batch_size=4, seed=1 + trainer.global_rank)
    trainer.fit(CausalLMModule(model, lr=1e-2, warmup_steps=0), loader(batches))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    torch.save(lora, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
