"""A long run on a tiny model: 500 steps with validation, checkpoints and CSV logs leak neither memory nor files."""

import os
import statistics

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaForCausalLM

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.lightning.checkpoint import AtomicCheckpointIO
from tests.conftest import counting_batches, loader, quiet_trainer, tiny_llama_config

PAGE = os.sysconf("SC_PAGE_SIZE")


class ProcessProbe(L.Callback):
    """This process's resident memory (bytes) and open file descriptors after each training step."""

    def __init__(self) -> None:
        self.rss: list[int] = []
        self.fds: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open("/proc/self/statm") as f:
            self.rss.append(int(f.read().split()[1]) * PAGE)
        self.fds.append(len(os.listdir("/proc/self/fd")))


def test_500_steps_keep_memory_and_open_files_flat(tmp_path):
    torch.manual_seed(0)
    probe = ProcessProbe()
    trainer = quiet_trainer(
        max_steps=500,
        plugins=[QLoRAPlugin(), AtomicCheckpointIO()],
        callbacks=[
            LoRAAdapters(r=4, alpha=8, dropout=0.05, export_dir=tmp_path / "adapter"),
            ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=50, save_top_k=0, save_last=True),
            probe,
        ],
        enable_checkpointing=True,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        log_every_n_steps=10,
        val_check_interval=50,
        check_val_every_n_epoch=None,
    )
    module = CausalLMModule(LlamaForCausalLM(tiny_llama_config()), lr=1e-3, warmup_steps=0)
    trainer.fit(module, loader(counting_batches(20, batch_size=4)), loader(counting_batches(2, batch_size=4, seed=9)))
    assert trainer.global_step == 500 and len(probe.rss) == 500
    early, late = statistics.median(probe.rss[50:100]), statistics.median(probe.rss[450:500])
    assert late <= 1.05 * early, f"RSS grew from {early / 2**20:.1f} MiB to {late / 2**20:.1f} MiB"
    # Every checkpoint and log write closed its file: as many descriptors open at the end as after warm-up.
    assert max(probe.fds[450:]) <= max(probe.fds[50:100]), (probe.fds[50:100], probe.fds[450:])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
