"""Launched by tests/lightning/test_ddp.py: a CPU fit through QLoRAPlugin on 2 DDP processes (gloo), or on 1.

Lightning's DDP launcher re-runs this script for rank 1, as it would a user's script. Each of the
6 steps takes the same 8 rows whatever the number of processes: each of 2 ranks takes its half,
as a distributed sampler would give it. Each rank saves its adapter weights so the test can
compare them, and what it wrote into the export.
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin  # noqa: E402
from tests.conftest import counting_batches, loader, tiny_llama_config  # noqa: E402


def count_writes(folder: Path) -> Counter:
    """Every file this process opens for writing under ``folder``, by file name (the export writes into
    a temporary sibling folder, then renames it), as Python's audit hook sees it: the export's JSON
    files and model card (safetensors writes from Rust, unseen)."""
    writes: Counter = Counter()
    folder = str(folder)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and (args[2] or 0) & writing:
            path = os.path.abspath(os.fspath(args[0]))
            if path.startswith(folder + os.sep):
                writes[os.path.basename(path)] += 1

    sys.addaudithook(hook)
    return writes


def main(out: Path, devices: int) -> None:
    writes = count_writes(out.resolve())
    L.seed_everything(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,  # each rank's rows are chosen below, as a distributed sampler would
        plugins=[QLoRAPlugin()],
        # Dropout 0: the masks would differ between one process and two.
        callbacks=[LoRAAdapters(r=4, alpha=8, dropout=0.0, export_dir=out / "adapter")],
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    per_rank = 8 // devices
    rows = slice(trainer.global_rank * per_rank, (trainer.global_rank + 1) * per_rank)
    batches = [{k: v[rows] for k, v in b.items()} for b in counting_batches(6, batch_size=8, seed=1)]
    # Lightning's DDP setup re-seeds from PL_GLOBAL_SEED before the plugin adds the adapters; one process
    # does not, so seed here too: both then draw the LoRA init from the same state.
    L.seed_everything(0)
    trainer.fit(CausalLMModule(model, lr=1e-2, warmup_steps=0), loader(batches))
    written_in_fit = dict(writes)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    torch.save(lora, out / f"rank{trainer.global_rank}.pt")
    (out / f"exports{trainer.global_rank}.json").write_text(json.dumps(written_in_fit))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
