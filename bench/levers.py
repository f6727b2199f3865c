"""Memory levers, each against the path without it: ours only, fresh processes, alternating.

    python bench/levers.py loss --runs 2          # chunked loss ("auto") vs the whole loss, 1 x 2048, no checkpointing
    python bench/levers.py padding --runs 2       # padding-free batches vs padded, the medical recipe's sample
    python bench/levers.py checkpointing --runs 2 # every layer vs every 2nd layer vs none, 1 x 1024

``loss`` runs ``bench/worker.py`` (the bench's own random batches, every token scored). ``padding``
trains the embedded SmolLM2-135M on the medical sample (PubMedQA's schema, the recipe's prompt
format) at batch 8, through ``PromptAnswerDataModule`` and ``Trainer(plugins=[QLoRAPlugin()])``;
tokens/s counts real (non-padding) tokens. ``checkpointing`` runs ``bench/worker.py`` with
``adapter.gradient_checkpointing`` True, 2 (every 2nd layer) and False. Writes
``bench/results/levers-<lever>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, hwm_mib, loadavg, machine_info, median, quiet_trainer, reset_hwm  # noqa: E402
from bench.run import alternating, run_worker  # noqa: E402


def padding_child(mode: str, steps: int, batch: int, threads: int) -> dict[str, Any]:
    """One fit of ``steps`` steps with ``data.packing=mode``; step times, real tokens and peak RSS."""
    import lightning as L
    import torch

    from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
    from lightning_qlora.io.models import load_tokenizer, resolve_model_path
    from lightning_qlora.tasks.data.datamodule import PromptAnswerDataModule
    from lightning_qlora.tasks.data.io import read_rows
    from lightning_qlora.tasks.data.tasks import get_task

    torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    model = str(resolve_model_path("smollm2-135m-instruct"))
    folder = ROOT / "recipes" / "medical" / "data"
    splits = {s: read_rows(folder / f"{s}.jsonl") for s in ("train", "validation")}
    task = get_task("pubmedqa")
    packing = {"padded": False, "padding_free": "padding_free"}[mode]
    dm = PromptAnswerDataModule(load_tokenizer(model), splits, task.to_pair, 512, batch, packing=packing)
    times: list[float] = []
    tokens: list[int] = []

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            reset_hwm()  # the training peak, without loading the fp32 checkpoint

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.start = time.perf_counter()
            labels = batch["labels"]
            tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.numel())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            times.append(time.perf_counter() - self.start)

    trainer = quiet_trainer(
        accelerator="cpu",
        plugins=[QLoRAPlugin()],
        callbacks=[LoRAAdapters(gradient_checkpointing=False), Timer()],
        max_steps=steps,
    )
    trainer.fit(CausalLMModule(model, warmup_steps=0), datamodule=dm)
    timed = slice(2, None)  # the first two steps warm up
    return {
        "mode": mode,
        "step_s": times,
        "tokens": tokens,
        "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mib": hwm_mib(),
    }


def run_padding(args: argparse.Namespace) -> dict[str, Any]:
    records: dict[str, list] = {"padded": [], "padding_free": []}
    for side in alternating(args.runs, ("padding_free", "padded")):
        spec = json.dumps({"mode": side, "steps": args.steps, "batch": 8, "threads": args.threads})
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
        cmd = [sys.executable, __file__, "--child", spec]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        rec = json.loads(done.stdout.strip().splitlines()[-1])
        records[side].append(rec)
        print(f"{side}: {rec['tokens_per_s']:.0f} tok/s, peak {rec['peak_rss_mib']:.0f} MiB", flush=True)
    summary = summarize(records, {k: lambda r, k=k: r[k] for k in ("tokens_per_s", "train_peak_rss_mib")})
    ratio = {k: summary["padding_free"][k] / summary["padded"][k] for k in summary["padded"]}
    return {"summary": summary, "ratio_padding_free_over_padded": ratio, "records": records}


def summarize(records: dict[str, list], fields: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per side, the median over runs of each field (a function of one run's record)."""
    return {side: {k: median([f(r) for r in recs]) for k, f in fields.items()} for side, recs in records.items()}


WORKER_FIELDS = {
    "median_step_s": lambda r: r["median_step_s"],
    "peak_rss_mib": lambda r: r["peak_rss_mib"],
    "minor_faults_per_step": lambda r: median(r["step_minor_faults"]),
    "sys_s_per_step": lambda r: median(r["step_sys_s"]),
}


def run_sides(args: argparse.Namespace, common: list[str], sides: dict[str, list[str]]) -> dict[str, list]:
    """``bench/worker.py`` runs of ours, one per side and run, in alternating order."""
    from lightning_qlora.io.models import resolve_model_path

    model = str(resolve_model_path("smollm2-135m-instruct"))
    head = ["speed", "--side", "ours", "--model", model, "--steps", str(args.steps), "--threads", str(args.threads)]
    records: dict[str, list] = {side: [] for side in sides}
    for side in alternating(args.runs, tuple(sides)):
        rec = run_worker([*head, *common, *sides[side]], args.threads)
        records[side].append(rec)
        print(f"{side}: step {rec['median_step_s']:.2f} s, peak {rec['peak_rss_mib']:.0f} MiB", flush=True)
    return records


def first_losses(records: dict[str, list]) -> dict[str, list[float]]:
    """Each run's first loss, per side: a lever changes memory or time, never the first loss."""
    return {side: [r["losses"][0] for r in recs] for side, recs in records.items()}


def run_loss(args: argparse.Namespace) -> dict[str, Any]:
    common = ["--warmup", "1", "--batch", "1", "--seq", "2048", "--no-gc", "--dropout", "0"]
    records = run_sides(args, common, {"auto": ["--loss-chunk", "auto"], "none": ["--loss-chunk", "none"]})
    summary = summarize(records, WORKER_FIELDS)
    ratio = {k: summary["auto"][k] / summary["none"][k] for k in ("median_step_s", "peak_rss_mib")}
    return {
        "summary": summary,
        "ratio_chunked_over_whole": ratio,
        "first_losses": first_losses(records),
        "records": records,
    }


def run_checkpointing(args: argparse.Namespace) -> dict[str, Any]:
    common = ["--warmup", "2", "--batch", "1", "--seq", "1024"]
    sides = {"every_layer": ["--gc"], "every_2nd": ["--gc", "--gc-every", "2"], "none": ["--no-gc"]}
    records = run_sides(args, common, sides)
    summary = summarize(records, WORKER_FIELDS)
    ratio = {
        side: {k: summary[side][k] / summary["every_layer"][k] for k in ("median_step_s", "peak_rss_mib")}
        for side in ("every_2nd", "none")
    }
    return {
        "summary": summary,
        "ratio_over_every_layer": ratio,
        "first_losses": first_losses(records),
        "records": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lever", nargs="?", choices=("loss", "padding", "checkpointing"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per run (default: loss 4, padding 12, checkpointing 5)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(padding_child(**json.loads(args.child))))
        return 0
    if args.lever is None:
        parser.error("name a lever: loss, padding or checkpointing")
    args.steps = args.steps or {"loss": 4, "padding": 12, "checkpointing": 5}[args.lever]
    start = loadavg()
    result = {"loss": run_loss, "padding": run_padding, "checkpointing": run_checkpointing}[args.lever](args)
    result = {
        "case": f"levers-{args.lever}",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "settings": {"runs": args.runs, "steps": args.steps, "threads": args.threads},
        "loadavg_start": start,
        "loadavg_end": loadavg(),
        **result,
    }
    out = RESULTS / f"levers-{args.lever}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("summary", "ratio"))}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
