"""Predicted (lightning_qlora.app.estimate) vs measured peak RSS of QLoRA training on CPU, through the plugin.

    .venv/bin/python bench/estimate_vs_measured.py                   # ~25 min on 2 cores
    .venv/bin/python bench/estimate_vs_measured.py --only b2-s384     # one or a few configs, nothing written

The path measured is the one users run: ``CausalLMModule(path)`` + ``Trainer(plugins=[QLoRAPlugin(...)])``
with the app's defaults (``low_memory="auto"``: Linear layers quantized while the safetensors are read;
``CPUOptions()``: glibc's default dynamic mmap threshold, ``malloc_trim`` after setup and on RSS creep).
A random-weight Llama of each shape is saved once as safetensors in a temporary folder; each config then
runs in a fresh process (no ``OMP_NUM_THREADS``, no ``MALLOC_*`` variable: torch's default thread count)
for ``--steps`` optimizer steps (LoRA r=16 on all linear layers, dropout 0.05, NF4 + double quant, AdamW).

Measured = the whole process's peak RSS (``ru_maxrss``, equal to VmHWM): imports, load and quantize,
and training. That is what an OOM killer sees, so the prediction compared is
``max(estimate.setup_peak, estimate.total)``; the setup part is recorded separately too.
Configs marked ``held_out`` were not looked at while the estimator's rules were written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "estimate_vs_measured.json"
MiB = 2**20

SHAPES = {
    # SmolLM2-135M and SmolLM2-360M (tied embeddings, 49,152-token vocabulary).
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5),
}  # fmt: skip
# (shape, batch, seq, gradient checkpointing, scored answer tokens or None, held out)
CONFIGS = [
    *(
        ("smollm2-135m", b, s, ckpt, None, False)
        for b, s in ((2, 128), (2, 384), (4, 512), (1, 1024))
        for ckpt in (True, False)
    ),
    ("smollm2-135m", 2, 384, True, 16, False),
    ("smollm2-135m", 4, 512, False, 16, False),
    ("smollm2-135m", 3, 256, True, None, True),
    ("smollm2-135m", 2, 768, False, None, True),
    ("smollm2-360m", 2, 256, True, None, True),
    ("smollm2-360m", 1, 512, False, 16, True),
]


def _status_mib(key: str) -> float:
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, **SHAPES[shape])


def config_name(shape: str, batch: int, seq: int, checkpointing: bool, answer: int | None) -> str:
    return f"{shape}/b{batch}-s{seq}" + ("" if checkpointing else "-nockpt") + (f"-answer{answer}" if answer else "")


def child_save(shape: str, folder: str) -> dict:
    """Save a random-weight model of ``shape`` as safetensors, the way a downloaded model sits on disk."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(shape)).save_pretrained(folder, safe_serialization=True)
    return {"saved": folder}


def batches(vocab: int, batch: int, seq: int, answer: int | None, steps: int) -> list[dict]:
    """Random token rows; with ``answer``, only each row's last ``answer`` tokens are scored."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        if answer:
            labels[:, : seq - answer] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def child_train(
    folder: str,
    batch: int,
    seq: int,
    checkpointing: bool,
    answer: int | None,
    steps: int,
    loss_chunk: int | str | None = "auto",
) -> dict:
    """Fit ``steps`` steps through QLoRAPlugin + Trainer; RSS figures in MiB."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_qlora import CausalLMModule, QLoRAPlugin
    from lightning_qlora.core.adapters import AdapterConfig

    rss_imports = _status_mib("VmRSS")
    marks: dict = {"steps": []}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            marks["rss_setup_mib"] = _status_mib("VmRSS")
            marks["hwm_setup_mib"] = _status_mib("VmHWM")
            marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            marks["steps"].append(
                {
                    "hwm_mib": _status_mib("VmHWM"),
                    "rss_mib": _status_mib("VmRSS"),
                    "seconds": round(now - marks["start"], 1),
                }
            )
            marks["start"] = now

    plugin = QLoRAPlugin(adapters=AdapterConfig(r=16, dropout=0.05, gradient_checkpointing=checkpointing))
    module = CausalLMModule(folder, warmup_steps=0, loss_chunk_size=loss_chunk)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        plugins=[plugin],
        callbacks=[Probe()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    trainer.fit(module, DataLoader(batches(vocab, batch, seq, answer, steps), batch_size=None))
    marks.pop("start", None)
    return {
        "threads": torch.get_num_threads(),
        "rss_imports_mib": rss_imports,
        **marks,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vmhwm_mib": _status_mib("VmHWM"),
        "trims": plugin._cpu_path.trims,
    }


def run_child(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    """bench.common's machine record, plus what this script's figures depend on."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import machine_info as common_machine_info

    return {
        **common_machine_info(),
        "libc": " ".join(platform.libc_ver()),
        "torch_threads": torch.get_num_threads(),
        "allocator": "glibc default (dynamic mmap threshold), CPUOptions() defaults",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the configs whose name contains this (writes nothing)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, help=f"results file (default: {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--measured", type=Path, help="reuse the measurements in this results file; predict again")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = child_save(**spec["save"]) if "save" in spec else child_train(**spec)
        print(json.dumps(result))
        return 0

    from lightning_qlora.app.estimate import estimate_memory

    # --measured: predict again against the measurements of an earlier run (no training).
    earlier = (
        {r["name"]: r["measured"] for r in json.loads(args.measured.read_text())["results"]} if args.measured else {}
    )
    out = args.out or (None if args.only else RESULTS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lq-estimate-") as tmp:
        saved: dict[str, str] = {}
        for shape, batch, seq, ckpt, answer, held_out in CONFIGS:
            name = config_name(shape, batch, seq, ckpt, answer)
            if (args.only and args.only not in name) or (args.measured and name not in earlier):
                continue
            if shape not in saved and not args.measured:
                saved[shape] = run_child({"save": {"shape": shape, "folder": str(Path(tmp) / shape)}})["saved"]
            est = estimate_memory(
                llama_config(shape), batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt, answer_tokens=answer
            )
            spec = dict(batch=batch, seq=seq, checkpointing=ckpt, answer=answer, steps=args.steps)
            measured = earlier.get(name) or run_child(dict(spec, folder=saved[shape]))
            predicted = max(est.total, est.setup_peak) / MiB
            row = {
                "name": name,
                "held_out": held_out,
                "config": dict(spec, shape=shape, quant="nf4", double_quant=True, r=16, lora_dropout=0.05),
                "predicted_mib": round(predicted, 1),
                "measured_mib": round(measured["peak_mib"], 1),
                "ratio": round(predicted / measured["peak_mib"], 3),
                "predicted_setup_mib": round(est.setup_peak / MiB, 1),
                "measured_setup_mib": round(measured["hwm_setup_mib"], 1),
                "peak_at": est.peak_at,
                "breakdown_mib": {k: round(v / MiB, 1) for k, v in est.parts().items()},
                "measured": measured,
            }
            rows.append(row)
            print(
                f"{name:<40} predicted {row['predicted_mib']:8.1f} MiB  measured {row['measured_mib']:8.1f} MiB"
                f"  ratio {row['ratio']:.3f}{'  (held out)' if held_out else ''}",
                flush=True,
            )
            if out:  # after every config, so that a long run leaves what it measured
                _write(out, rows, args)
    return 0


def _write(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    command = "python bench/estimate_vs_measured.py" + (f" --steps {args.steps}" if args.steps != 3 else "")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command + (f" --measured {args.measured}" if args.measured else ""),
        "machine": machine_info(),
        "measured_quantity": "whole-process peak RSS (ru_maxrss): imports, low-memory load + quantize, training",
        "predicted_quantity": "max(MemoryEstimate.setup_peak, MemoryEstimate.total)",
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
