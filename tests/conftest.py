"""Shared fixtures: tiny random models built from a config, and a learnable toy task."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

# Keep tests offline and quiet; the default-model cache may be shared between runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 64
SEQ = 16

# The models the tests train are tiny (64-wide): their ops are too small to share out over threads,
# and OpenMP's hand-offs between 2 threads made a step several times slower than one thread. Child
# processes (train.py, the CLI, DDP ranks) inherit one thread too; no code path depends on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# What Lightning's distributed setup writes into os.environ. A test that sets up a strategy in
# this process leaves MASTER_PORT behind, still bound here, and every 2-process run launched
# afterwards (DDP, FSDP, train.py) inherits it and fails with EADDRINUSE.
_DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


# `-m "not slow"` must never load or convert the real default model: that is what `slow` marks.
# For every other test the model cache points below a regular file, so a child process (train.py,
# the CLI) that reaches the model fails naming this path, and in this process the conversion is
# refused in one line.
_NOT_SLOW_CACHE = "a-test-not-marked-slow-loaded-the-default-model"
_guard_root: Path | None = None


def pytest_configure(config):
    global _guard_root
    _guard_root = Path(tempfile.mkdtemp(prefix="lq-model-guard-"))
    (_guard_root / _NOT_SLOW_CACHE).write_text("not a cache: mark the test @pytest.mark.slow\n")


def pytest_unconfigure(config):
    if _guard_root is not None:
        shutil.rmtree(_guard_root, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Set up, run and tear down each test not marked slow (its session fixtures too) with the guard on."""
    if item.get_closest_marker("slow") is not None or _guard_root is None:
        yield
        return
    from lightning_qlora.io import models

    def refuse() -> Path:
        raise RuntimeError(f"{item.nodeid} loads the real default model: mark it @pytest.mark.slow or use a tiny model")

    saved_env, saved_fn = os.environ.get("LIGHTNING_QLORA_CACHE"), models.default_model_dir
    os.environ["LIGHTNING_QLORA_CACHE"] = str(_guard_root / _NOT_SLOW_CACHE / "cache")
    models.default_model_dir = refuse
    try:
        yield
    finally:
        models.default_model_dir = saved_fn
        if saved_env is None:
            os.environ.pop("LIGHTNING_QLORA_CACHE", None)
        else:
            os.environ["LIGHTNING_QLORA_CACHE"] = saved_env


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    before = {key: os.environ.get(key) for key in _DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    # initializer_range=0.3: with the embeddings and head frozen at the usual 0.02, the
    # logit range is capped and a LoRA-only model cannot get far below ln(vocab).
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def counting_batches(n: int, batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences start, start+1, ... (mod vocab): learnable from the first token on."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
        ids = (start + torch.arange(SEQ)) % VOCAB
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None)


class LossRecorder(L.Callback):
    """Keeps every training loss, to compare the start and the end of a run."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class CountOps(TorchDispatchMode):
    """Counts calls of the named ops (e.g. ``"bernoulli_"``, ``"dequantize_4bit"``)."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.counts = dict.fromkeys(names, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.counts:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A full disk for this process: no file may grow past ``nbytes`` (EFBIG), as ``ulimit -f`` sets it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
