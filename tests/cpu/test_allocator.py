"""The CPU allocator policy: freed memory goes back to the OS, large-buffer pinning is opt-in."""

import platform
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_qlora.cpu import CPUOptions
from lightning_qlora.cpu import allocator as cpu
from lightning_qlora.lightning.plugin import QLoRAPlugin

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc only: other C libraries have no mmap threshold or malloc_trim",
)


def _fragment(count: int = 6000) -> tuple[list, list]:
    """``count`` 32 KiB heap blocks (6000: ~188 MiB), each followed by a small live block that pins the heap.

    32 KiB stays under any mmap threshold, so the blocks land on the heap; once they are freed,
    the live blocks between them stop glibc from shrinking the heap by itself.
    """
    blocks, keep = [], []
    for _ in range(count):
        blocks.append(np.ones(32 * 1024 // 8))
        keep.append(np.ones(256))  # 2 KiB: above numpy's small-buffer cache, so from malloc
    return blocks, keep


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@glibc_only
def test_release_free_memory_returns_fragmented_heap_pages():
    blocks, keep = _fragment()
    del blocks
    before = _rss_mib()
    assert cpu.release_free_memory()
    after = _rss_mib()
    assert before - after > 100, (before, after)
    del keep


PROBE = """
import ctypes, sys
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from lightning_qlora import CPUOptions
from lightning_qlora.lightning.plugin import QLoRAPlugin

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
threshold = None if sys.argv[1] == "none" else int(sys.argv[1])
QLoRAPlugin(cpu=CPUOptions(mmap_threshold=threshold)).convert_module(LlamaForCausalLM(config))
before = libc.mallinfo2().hblks
blocks = [np.ones(100 * 1024 // 8) for _ in range(10)]  # 100 KiB: under glibc's initial 128 KiB threshold
print(libc.mallinfo2().hblks - before)
"""


@glibc_only
@pytest.mark.parametrize(("threshold", "mapped"), [("none", 0), ("65536", 10)])
def test_large_buffer_pinning_is_opt_in(threshold, mapped):
    # In a fresh process: the threshold is process-wide, and pinning it would slow the rest of the suite.
    done = subprocess.run([sys.executable, "-c", PROBE, threshold], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == mapped


class _Fragment(L.Callback):
    """At step 1 only, frees a fragmented ~470 MiB before the optimizer step; records RSS around the step's end."""

    def __init__(self):
        self.drops = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            blocks, self.keep = _fragment(15000)
            del blocks
        self.before = _rss_mib()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.drops.append(self.before - _rss_mib())


@glibc_only
@pytest.mark.parametrize("release", [True, False])
def test_heap_is_trimmed_when_rss_creeps_not_every_step(tiny_llama, release):
    if release:
        plugin = QLoRAPlugin(cpu=CPUOptions(release_memory=True))
    else:
        with pytest.warns(DeprecationWarning, match=r"cpu_release_memory=\.\.\.\) is deprecated"):
            plugin = QLoRAPlugin(cpu_release_memory=False)  # the deprecated alias still takes effect

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    probe = _Fragment()
    trainer = L.Trainer(
        accelerator="cpu",
        plugins=[plugin],
        callbacks=[probe],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), DataLoader([torch.randint(0, 16, (1, 8)) for _ in range(3)], batch_size=None))
    if release:
        # Step 1's freed 470 MiB put RSS over 1.25x its lowest point: trimmed once, not at steps 0 and 2.
        assert plugin._cpu_path.trims == 1
        assert probe.drops[1] > 300 and max(probe.drops[0], probe.drops[2]) < 50, probe.drops
    else:
        assert plugin._cpu_path.trims == 0
        assert max(probe.drops) < 50, probe.drops


def test_creep_guard_trims_only_above_its_growth_factor(monkeypatch):
    readings = iter([1000, 1100, 1300, 900, 1100, 1200])
    trimmed_at = []
    monkeypatch.setattr(cpu, "rss_bytes", lambda: next(readings))
    monkeypatch.setattr(cpu, "release_free_memory", lambda: trimmed_at.append(len(trimmed_at)) or True)
    guard = cpu.CreepGuard(growth=1.25)
    results = [guard.after_step() for _ in range(6)]
    # 1300 > 1.25 x 1000 trims; 900 lowers the floor, so 1200 > 1125 trims again.
    assert results == [False, False, True, False, False, True]
    assert guard.trims == 2 and guard.floor == 900


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold=0 should be a positive number of bytes"):
        cpu.pin_mmap_threshold(0)
    with pytest.raises(ValueError, match=r"CPUOptions\(mmap_threshold=-1\): expected a positive whole number of bytes"):
        QLoRAPlugin(cpu=CPUOptions(mmap_threshold=-1))
    with pytest.raises(ValueError, match=r"CPUOptions\(mmap_threshold=-1\)"):  # the deprecated alias, checked alike
        QLoRAPlugin(cpu_mmap_threshold=-1)


def _mapped(path) -> bool:
    return any(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_copy_file_backed_lets_the_checkpoint_mapping_go(tmp_path):
    import gc

    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    shard = (tmp_path / "model.safetensors").resolve()
    before = model.model.embed_tokens.weight.detach().clone()
    if not _mapped(shard):
        pytest.skip("this transformers version copied the weights on load; nothing stays mapped")
    copied = cpu.copy_file_backed(model)
    gc.collect()
    # Every fp32 tensor was a view of the file; all are copies now, and the mapping is gone.
    assert copied == sum(p.numel() * 4 for p in model.parameters()), copied
    assert not _mapped(shard)
    assert torch.equal(model.model.embed_tokens.weight, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert cpu.copy_file_backed(model) == 0  # nothing left to copy
