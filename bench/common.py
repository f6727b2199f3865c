"""Helpers shared by the benchmark driver and its workers: memory probes, data, machine info, summaries."""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import statistics
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MiB = 2**20

# What the two sides share: LoRA as in the QLoRA paper, on every Linear layer but the head.
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4
# Environment that changes CPU timings or RSS (thread pools; glibc returning freed memory).
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_mib() -> float:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, and with it ru_maxrss), so that later peaks exclude loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # not Linux, or not allowed: VmHWM then stays the whole-process peak
        return False


def hwm_mib() -> float:
    """Peak resident memory since the last :func:`reset_hwm` (or since the start)."""
    return _status_kib("VmHWM") / 1024


def pin_mmap_threshold(threshold: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, threshold)`` for this process, as ``CPUOptions(mmap_threshold=...)`` does.

    Lets the peer run under the same allocator policy as ours, without importing our package.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD in malloc.h
    except (OSError, AttributeError):
        return False


def random_batches(vocab: int, steps: int, batch: int, seq: int, seed: int) -> list[dict[str, Any]]:
    """``steps`` batches of seeded random token ids; every token is scored (labels = input_ids)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def checkpoint_mode(model) -> str:
    """How the model's gradient checkpointing runs: ``off``, ``reentrant`` or ``non-reentrant``."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and getattr(module, "gradient_checkpointing", False):
            reentrant = getattr(func, "keywords", {}).get("use_reentrant")
            # torch.utils.checkpoint's default (with a warning) is still the reentrant variant.
            return "reentrant (torch default)" if reentrant is None else ("reentrant" if reentrant else "non-reentrant")
    return "off"


def bnb_cpu_kernel(model) -> dict[str, int]:
    """Counts of bitsandbytes 4-bit layers by their AVX512-BF16 setting, and how many got repacked."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return {
        "linear4bit": len(layers),
        "support_avx512bf16_for_cpu": sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers),
        "repacked_for_cpu": sum(
            bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
            for m in layers
            if m.weight.quant_state is not None
        ),
    }


def _cpu_model() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor()


def _cpu_flags() -> list[str]:
    try:
        match = re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return []
    flags = set(match.group(1).split()) if match else set()
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src"))}


def machine_info() -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    import bitsandbytes
    import lightning
    import peft
    import torch
    import transformers

    meminfo = Path("/proc/meminfo")
    mem = re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text()) if meminfo.exists() else None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
        "git": _git(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def loadavg() -> list[float]:
    """1, 5 and 15-minute load averages: other processes on the machine skew CPU timings."""
    return [round(x, 2) for x in os.getloadavg()]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# Per-run figures aggregated across runs (median), and whether lower is better for the ratio.
METRICS = {
    "median_step_s": "lower",
    "tokens_per_s": "higher",
    "median_step_cpu_s": "lower",
    "peak_rss_mib": "lower",
    "train_peak_rss_mib": "lower",
    "peak_gpu_mib": "lower",
    "train_peak_gpu_mib": "lower",
    "setup_s": "lower",
}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of each per-run figure, plus the per-run values for the record."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in METRICS:
        values = [r.get(key) for r in runs]
        if any(v is not None for v in values):
            out[key] = median(values)
            out[f"{key}_all"] = values
    out["first_loss"] = median([r["losses"][0] for r in runs])
    return out


def compare(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float]:
    """``ours / peer`` for each figure both sides have (for tokens/s, above 1 is better; else below 1)."""
    ratios = {}
    for key in METRICS:
        if ours.get(key) is not None and peer.get(key):
            ratios[key] = round(ours[key] / peer[key], 4)
    return ratios


def quiet_trainer(**kwargs: Any) -> Any:
    """A Lightning Trainer that only trains: no logger, checkpoints, progress bar, summary or validation."""
    import lightning as L

    quiet = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**quiet, **kwargs})
