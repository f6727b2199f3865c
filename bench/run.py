"""Benchmark our QLoRA stack against the usual one (transformers + bitsandbytes + PEFT).

    python bench/run.py cpu --runs 3 --steps 10           # SmolLM2-135M, fp32, batch 2 x 128, checkpointing on
    python bench/run.py cpu --runs 3 --steps 10 --no-gc   # the same without gradient checkpointing
    python bench/run.py gpu --runs 3 --steps 10           # random Llama-3-8B shape, bf16, batch 2 x 2048 (CUDA)
    python bench/run.py gpu --runs 1 --steps 5            # the same, as scripts/gpu_check.sh runs it
    python bench/run.py quality --steps 30                # eval loss: QLoRA vs 16-bit LoRA, medical sample

Every measurement is a fresh ``bench/worker.py`` process; the sides alternate (ours, peer,
then peer, ours, ...) so that drift in the machine's load hits both alike. Results go to
``bench/results/<case>.json`` with the machine, versions, command and load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (`python bench/run.py`): make `bench` importable from the repo root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, compare, loadavg, machine_info, median, summarize  # noqa: E402

RANDOM_PREFIX = "random:"  # as in bench/worker.py, which this module does not import (it is run, not loaded)

WORKER = ROOT / "bench" / "worker.py"
# The targets (ours / peer; quality: QLoRA / 16-bit LoRA eval loss).
TARGETS = {"median_step_s": 0.9, "peak_rss_mib": 1.0, "quality_loss_ratio": 1.02}
# Built in each worker, straight onto the GPU and quantized block by block (bench/worker.py
# random_llama): no 16 GB checkpoint on disk, and the same seeded weights on both sides.
DEFAULT_GPU_MODEL = "random:llama3-8b"


def parse_result(stdout: str) -> dict[str, Any]:
    """The worker's result: the last stdout line that is a JSON object (libraries may print before it)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON result line in the worker's output:\n{stdout[-2000:]}")


def run_worker(argv: list[str], threads: int, timeout: float | None = None) -> dict[str, Any]:
    """Run ``bench/worker.py argv`` in a fresh process and return its JSON result."""
    env = dict(os.environ)
    # Equal thread pools on both sides: torch.set_num_threads in the worker, OpenMP/MKL here.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    proc = subprocess.run(
        [sys.executable, str(WORKER), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {shlex.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return parse_result(proc.stdout)


def alternating(runs: int, sides: tuple[str, ...]) -> list[str]:
    """A, B, B, A, A, B, ...: each side goes first equally often, so load drift cancels."""
    order: list[str] = []
    for i in range(runs):
        order += list(sides if i % 2 == 0 else sides[::-1])
    return order


def speed_result(records: dict[str, list[dict]], meta: dict[str, Any]) -> dict[str, Any]:
    """Medians per side, ours/peer ratios, the loss check and the targets."""
    ours, peer = summarize(records["ours"]), summarize(records["peer"])
    ratios = compare(ours, peer)
    first = [abs(o["losses"][0] - p["losses"][0]) for o, p in zip(records["ours"], records["peer"], strict=False)]
    memory_key = "train_peak_gpu_mib" if meta["device"] == "cuda" else "peak_rss_mib"
    return {
        **meta,
        "ours": ours,
        "peer": peer,
        "ratio_ours_over_peer": ratios,
        # Same weights, quantization and batch: the first loss must agree (B = 0, so dropout plays no part).
        "first_loss_abs_diff": max(first) if first else None,
        "targets": {
            "step_time_ratio_max": TARGETS["median_step_s"],
            "step_time_met": ratios.get("median_step_s", float("inf")) <= TARGETS["median_step_s"],
            "memory_metric": memory_key,
            "memory_ratio_max": TARGETS["peak_rss_mib"],
            "memory_met": ratios.get(memory_key, float("inf")) <= TARGETS["peak_rss_mib"],
        },
        "records": records,
    }


def run_speed(args: argparse.Namespace, model: str, device: str) -> dict[str, Any]:
    common = ["speed", "--model", model, "--device", device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--batch", str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed)]
    common += ["--threads", str(args.threads), "--gc" if args.gc else "--no-gc", "--peer-cpu-bf16", args.peer_cpu_bf16]
    common += ["--peer-gc", args.peer_gc, "--mmap-threshold", args.mmap_threshold]
    common += ["--reuse" if args.reuse else "--no-reuse"]
    common += ["--fast-dropout" if args.fast_dropout else "--no-fast-dropout"]
    for flag in ("r", "dropout"):  # the matrix's cells set these (bench/matrix.py); unset: the worker's LORA
        if getattr(args, flag, None) is not None:
            common += [f"--{flag}", str(getattr(args, flag))]
    records: dict[str, list[dict]] = {"ours": [], "peer": []}
    errors: list[dict[str, Any]] = []
    start = loadavg()
    for i, side in enumerate(alternating(args.runs, ("ours", "peer"))):
        extra = []
        if args.profile and len(records[side]) == 0:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            extra = ["--profile", str(Path(args.profile) / f"{args.case}-{side}.txt")]
        try:
            rec = run_worker([*common, "--side", side, *extra], args.threads, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            if args.case != "gpu":
                raise
            # One scarce GPU session: keep the other side's figures and say what failed.
            errors.append({"side": side, "run": i, "error": str(err)[-3000:]})
            print(f"[{i + 1}/{2 * args.runs}] {side:4s} FAILED: {str(err).splitlines()[0]}", flush=True)
            continue
        records[side].append(rec)
        mem = rec.get("train_peak_gpu_mib") if device == "cuda" else rec["peak_rss_mib"]
        print(
            f"[{i + 1}/{2 * args.runs}] {side:4s} step {rec['median_step_s']:.3f} s"
            f" (cpu {rec['median_step_cpu_s']:.3f} s), {rec['tokens_per_s']:.0f} tok/s, peak {mem:.0f} MiB,"
            f" first loss {rec['losses'][0]:.5f}, load {rec['loadavg_before'][0]}->{rec['loadavg_after'][0]}",
            flush=True,
        )
    meta = {
        "case": args.case,
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "model": model,
        "device": device,
        "settings": {k: getattr(args, k) for k in ("runs", "steps", "warmup", "batch", "seq", "seed", "threads", "gc")},
        "peer_cpu_bf16": args.peer_cpu_bf16,
        "peer_gc": args.peer_gc,
        "mmap_threshold": args.mmap_threshold,
        "reuse_recompute": args.reuse,
        "fast_dropout": args.fast_dropout,
        "loadavg_start": start,
        "loadavg_end": loadavg(),
    }
    if errors:
        meta["errors"] = errors
    return speed_result(records, meta)


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    records: dict[str, list[dict]] = {"qlora": [], "lora16": []}
    start = loadavg()
    seeds = [args.seed + i for i in range(args.runs)]
    for i, side in enumerate(alternating(args.runs, ("qlora", "lora16"))):
        seed = seeds[len(records[side])]
        argv = ["quality", "--side", side, "--model", args.model, "--steps", str(args.steps)]
        argv += ["--batch", str(args.batch), "--seed", str(seed), "--threads", str(args.threads)]
        argv += ["--gc" if args.gc else "--no-gc", "--device", args.device]
        argv += ["--task", args.task] if args.task else []
        rec = run_worker(argv, args.threads, args.timeout)
        records[side].append(rec)
        print(
            f"[{i + 1}/{2 * args.runs}] {side:6s} seed {seed}: val_loss {rec['val_before']['val_loss']:.4f}"
            f" -> {rec['val_after']['val_loss']:.4f}, fit {rec['fit_s']:.0f} s",
            flush=True,
        )
    after = {s: [r["val_after"]["val_loss"] for r in recs] for s, recs in records.items()}
    before = {s: [r["val_before"]["val_loss"] for r in recs] for s, recs in records.items()}
    ratios = [q / f for q, f in zip(after["qlora"], after["lora16"], strict=True)]
    ratio = median(ratios)
    return {
        "case": "quality",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "settings": {k: getattr(args, k) for k in ("runs", "steps", "batch", "seed", "threads", "gc", "model", "task")},
        "val_loss_before": {s: median(v) for s, v in before.items()},
        "val_loss_after": {s: median(v) for s, v in after.items()},
        "ratio_qlora_over_lora16": ratio,
        "ratio_per_seed": ratios,
        "targets": {"loss_ratio_max": TARGETS["quality_loss_ratio"], "met": ratio <= TARGETS["quality_loss_ratio"]},
        "loadavg_start": start,
        "loadavg_end": loadavg(),
        "records": records,
    }


def markdown(result: dict[str, Any]) -> str:
    """A short table of a result, for bench/README.md."""
    if result["case"] == "quality":
        b, a = result["val_loss_before"], result["val_loss_after"]
        return "\n".join(
            [
                "| | QLoRA (ours, NF4) | 16-bit LoRA | ratio |",
                "|---|---|---|---|",
                f"| val loss before | {b['qlora']:.4f} | {b['lora16']:.4f} | {b['qlora'] / b['lora16']:.4f} |",
                f"| val loss after {result['settings']['steps']} steps | {a['qlora']:.4f} | {a['lora16']:.4f}"
                f" | {result['ratio_qlora_over_lora16']:.4f} |",
            ]
        )
    o, p, r = result["ours"], result["peer"], result["ratio_ours_over_peer"]
    rows = [
        ("median step (s)", "median_step_s", "{:.3f}"),
        ("tokens/s", "tokens_per_s", "{:.1f}"),
        ("median step CPU time (s)", "median_step_cpu_s", "{:.3f}"),
        ("peak RSS, whole process (MiB)", "peak_rss_mib", "{:.0f}"),
        ("peak RSS, training only (MiB)", "train_peak_rss_mib", "{:.0f}"),
        ("peak GPU memory, whole process (MiB)", "peak_gpu_mib", "{:.0f}"),
        ("peak GPU memory, training (MiB)", "train_peak_gpu_mib", "{:.0f}"),
        ("setup: start to first step (s)", "setup_s", "{:.1f}"),
    ]
    lines = ["| | ours | peer | ours / peer |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        if o.get(key) is not None and p.get(key) is not None:
            lines.append(f"| {label} | {fmt.format(o[key])} | {fmt.format(p[key])} | {r.get(key, float('nan')):.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="case", required=True)
    cpu = sub.add_parser("cpu", help="SmolLM2-135M on CPU, fp32 compute")
    gpu = sub.add_parser("gpu", help="random Llama-3-8B-shaped model on one CUDA GPU, bf16 compute")
    quality = sub.add_parser("quality", help="QLoRA vs 16-bit LoRA eval loss on the medical recipe's sample")
    for p, steps, batch, seq in ((cpu, 10, 2, 128), (gpu, 10, 2, 2048)):
        p.add_argument("--steps", type=int, default=steps, help="training steps per run (the first --warmup untimed)")
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--seq", type=int, default=seq)
        p.add_argument("--peer-cpu-bf16", choices=("stock", "off"), default="stock")
        p.add_argument(
            "--peer-gc", choices=("default", "non-reentrant"), default="default", help="peer's checkpointing"
        )
        p.add_argument("--profile", help="folder for torch.profiler tables of each side's first run")
        p.add_argument(
            "--reuse",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="ours: reuse the checkpoint recompute's dequantized weights and dropout masks (as shipped)",
        )
        p.add_argument(
            "--fast-dropout",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="ours: draw LoRA dropout masks from 8 random bits per element (as shipped); off: torch's bernoulli_",
        )
        p.add_argument(
            "--mmap-threshold",
            default="default",
            help="CPU allocator policy: 'default' (as shipped), 'glibc' (neither side pins), or bytes (both pin)",
        )
    cpu.add_argument("--model", default="smollm2-135m-instruct")
    gpu.add_argument(
        "--model",
        default=DEFAULT_GPU_MODEL,
        help="random:llama3-8b (default; built in-process), random:llama-1b, random:tiny, or a bf16 model directory",
    )
    # Only to try the harness at a tiny shape on a machine without a GPU (random:tiny); figures are CPU ones.
    gpu.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    quality.add_argument("--model", default="smollm2-135m-instruct")
    quality.add_argument("--steps", type=int, default=30)
    quality.add_argument("--batch", type=int, default=4)
    # The metric: PubMedQA decision + explanation (the recipe itself now trains the decision only).
    quality.add_argument(
        "--task",
        help="data.task: pubmedqa_decision (the medical recipe's default, and this one's) or pubmedqa",
    )
    quality.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    for p in (cpu, gpu, quality):
        p.add_argument("--runs", type=int, default=3 if p is not quality else 1, help="runs per side (quality: seeds)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--gc", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing")
        p.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
        p.add_argument("--out", type=Path, help="results file (default: bench/results/<case>[-nogc].json)")
    args = parser.parse_args(argv)
    if args.case != "quality" and not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup={args.warmup} must be in [0, --steps={args.steps}).")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case == "quality":
        result = run_quality(args)
    elif args.case == "cpu":
        from lightning_qlora.io.models import resolve_model_path

        result = run_speed(args, resolve_model_path(args.model), "cpu")
    else:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print("bench/run.py gpu needs a CUDA GPU; none is visible.", file=sys.stderr)
            return 2
        model = args.model
        if not model.startswith(RANDOM_PREFIX) and not (Path(model) / "config.json").is_file():
            print(f"--model {model}: not random:<shape> nor a model directory.", file=sys.stderr)
            return 2
        result = run_speed(args, model, args.device)
    out = args.out or RESULTS / f"{args.case}{'' if args.gc else '-nogc'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {out}")
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
