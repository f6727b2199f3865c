"""Predicted (lightning_qlora.app.estimate) vs measured peak RSS of real QLoRA training steps on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/estimate_vs_measured.py        # ~15 min on 2 cores
    .venv/bin/python bench/estimate_vs_measured.py --only smollm2-135m/b2-s256

Each configuration runs in a fresh subprocess: a random-weight Llama of the given shape is
built in fp32, quantized with ``quantize_model`` (NF4 + double quant) and given LoRA adapters
with ``add_adapters`` (r=16, all linear, dropout 0.05). Then the peak-RSS mark (VmHWM) is
reset through ``/proc/self/clear_refs``, so that the fp32 weights of the setup do not count,
and two training steps run: ``CausalLMModule``'s own loss path (head only at scored
positions), backward, AdamW step. The second step is the steady state that the estimator
predicts (optimizer states already allocated).

Measured = VmHWM over the two steps: the whole process's resident memory at its training peak,
framework overhead included, which is what ``MemoryEstimate.total`` predicts.

The main runs fix glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed
tensors go back to the OS; a few runs repeat with glibc's default dynamic threshold, under
which freed activations stay resident (column ``allocator``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
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
# (shape, batch, seq, gradient checkpointing, scored answer tokens or None, allocator)
CONFIGS = [
    ("smollm2-135m", 2, 256, True, None, "returning"),
    ("smollm2-135m", 2, 512, True, None, "returning"),
    ("smollm2-135m", 4, 512, True, None, "returning"),
    ("smollm2-360m", 2, 256, True, None, "returning"),
    ("smollm2-135m", 2, 256, False, None, "returning"),
    ("smollm2-135m", 2, 512, True, 16, "returning"),
    ("smollm2-135m", 2, 256, True, None, "glibc-default"),
    ("smollm2-135m", 4, 512, True, None, "glibc-default"),
    ("smollm2-135m", 2, 256, False, None, "glibc-default"),
]
ALLOCATOR_ENV = {"returning": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc-default": {}}


def _status_mib(key: str) -> float:
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, **SHAPES[shape])


def config_name(shape: str, batch: int, seq: int, checkpointing: bool, answer: int | None, allocator: str) -> str:
    name = f"{shape}/b{batch}-s{seq}"
    name += "" if checkpointing else "-nockpt"
    name += f"-answer{answer}" if answer else ""
    return name + ("" if allocator == "returning" else f" [{allocator}]")


def child_overhead() -> dict:
    """RSS after importing what a training process imports, and nothing else."""
    import bitsandbytes  # noqa: F401
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return {"rss_mib": _status_mib("VmRSS")}


def child_train(shape: str, batch: int, seq: int, checkpointing: bool, answer: int | None, steps: int) -> dict:
    """Set up a QLoRA model, reset the peak mark, train ``steps`` steps; report RSS figures in MiB."""
    import resource

    import torch

    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM

    from lightning_qlora.core.adapters import AdapterConfig, add_adapters
    from lightning_qlora.core.quantize import QuantConfig, quantize_model
    from lightning_qlora.tasks.causal_lm import CausalLMModule

    rss_imports = _status_mib("VmRSS")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(shape))
    quantize_model(model, QuantConfig("nf4"))
    add_adapters(model, AdapterConfig(r=16, dropout=0.05, gradient_checkpointing=checkpointing))
    module = CausalLMModule(model)  # puts the model in train mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gc.collect()
    rss_setup = _status_mib("VmRSS")

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    if answer:
        labels[:, : seq - answer] = -100  # only the last `answer` positions are scored
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the setup's fp32 weights don't count
    per_step = []
    for _ in range(steps):
        start = time.perf_counter()
        nll, count = module._loss_sums(data)
        (nll / count.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        per_step.append({"hwm_mib": _status_mib("VmHWM"), "seconds": round(time.perf_counter() - start, 1)})
    return {
        "rss_imports_mib": rss_imports,
        "rss_setup_mib": rss_setup,
        "peak_mib": _status_mib("VmHWM"),
        "rss_after_mib": _status_mib("VmRSS"),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # includes the setup
        "steps": per_step,
    }


def run_child(args: list[str], allocator: str) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.update(OMP_NUM_THREADS="1", **ALLOCATOR_ENV[allocator])
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    """bench.common's machine record, plus what this script's figures depend on."""
    sys.path.insert(0, str(ROOT))
    from bench.common import machine_info as common_machine_info

    return {**common_machine_info(), "libc": " ".join(platform.libc_ver()), "threads": 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the configs whose name contains this")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, help=f"results file (default: {RESULTS.relative_to(ROOT)}; none with --only)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = child_overhead() if spec.get("overhead") else child_train(**spec)
        print(json.dumps(result))
        return 0

    from lightning_qlora.app.estimate import FRAMEWORK_OVERHEAD, estimate_memory

    overhead = run_child(["--child", json.dumps({"overhead": True})], "glibc-default")
    print(f"framework overhead: measured {overhead['rss_mib']:.1f} MiB, constant {FRAMEWORK_OVERHEAD / MiB:.1f} MiB")
    rows = []
    for shape, batch, seq, ckpt, answer, allocator in CONFIGS:
        name = config_name(shape, batch, seq, ckpt, answer, allocator)
        if args.only and args.only not in name:
            continue
        est = estimate_memory(
            llama_config(shape), batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt, answer_tokens=answer
        )
        spec = dict(shape=shape, batch=batch, seq=seq, checkpointing=ckpt, answer=answer, steps=args.steps)
        measured = run_child(["--child", json.dumps(spec)], allocator)
        static = est.overhead + est.base_weights + est.adapters
        row = {
            "name": name,
            "config": dict(spec, allocator=allocator, quant="nf4", double_quant=True, r=16, lora_dropout=0.05),
            "predicted_mib": round(est.total / MiB, 1),
            "measured_mib": round(measured["peak_mib"], 1),
            "ratio": round(est.total / MiB / measured["peak_mib"], 3),
            # The part that depends on batch and seq: peak minus the RSS after setup.
            "predicted_training_mib": round((est.total - static) / MiB, 1),
            "measured_training_mib": round(measured["peak_mib"] - measured["rss_setup_mib"], 1),
            "predicted_setup_mib": round(static / MiB, 1),
            "peak_at": est.peak_at,
            "breakdown_mib": {
                k: round(getattr(est, k) / MiB, 1)
                for k in ("overhead", "base_weights", "adapters", "gradients", "optimizer", "activations", "logits")
            },
            "measured": measured,
        }
        row["training_ratio"] = round(row["predicted_training_mib"] / max(row["measured_training_mib"], 1e-9), 3)
        rows.append(row)
        print(
            f"{name:<45} predicted {row['predicted_mib']:8.1f} MiB  measured {row['measured_mib']:8.1f} MiB"
            f"  ratio {row['ratio']:.3f}  (training part {row['predicted_training_mib']:.1f} vs"
            f" {row['measured_training_mib']:.1f}: {row['training_ratio']:.3f})",
            flush=True,
        )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "measured_quantity": "VmHWM over the training steps after resetting it post-setup (whole-process peak RSS)",
        "framework_overhead_mib": {"measured": overhead["rss_mib"], "constant": FRAMEWORK_OVERHEAD / MiB},
        "results": rows,
    }
    out = args.out or (None if args.only else RESULTS)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
