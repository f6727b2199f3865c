"""The configuration matrix: ours vs the peer stack in the cells users run, not one headline.

    python bench/matrix.py                         # every cell, 3 runs x 7 steps (5 timed) per side
    python bench/matrix.py --only B E --runs 1     # some cells

Each cell is ``bench/run.py cpu``'s measurement (fresh worker processes, sides alternating) on the
embedded SmolLM2-135M, fp32 compute, each stack as shipped. Writes ``bench/results/matrix.json``
(every run's record, per cell) and prints the table kept in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, loadavg, machine_info  # noqa: E402
from bench.run import run_speed  # noqa: E402

# cell: (gradient checkpointing, LoRA dropout, batch, seq, r), as issue 20 lists them.
CELLS: dict[str, tuple[bool, float, int, int, int]] = {
    "A": (True, 0.05, 2, 128, 16),
    "B": (False, 0.0, 2, 128, 16),
    "C": (False, 0.05, 4, 256, 16),
    "D": (True, 0.0, 1, 1024, 16),
    "E": (False, 0.0, 1, 2048, 16),
    "F": (True, 0.05, 2, 512, 64),
}
TARGET, CEILING = 0.85, 1.0  # ours / peer, step time and peak RSS


def cell_args(name: str, args: argparse.Namespace) -> argparse.Namespace:
    gc, dropout, batch, seq, r = CELLS[name]
    return argparse.Namespace(
        case=f"matrix-{name}",
        runs=args.runs,
        steps=args.steps,
        warmup=args.warmup,
        batch=batch,
        seq=seq,
        seed=0,
        threads=args.threads,
        gc=gc,
        dropout=dropout,
        r=r,
        peer_cpu_bf16="stock",
        peer_gc="default",
        mmap_threshold="default",
        reuse=True,
        fast_dropout=True,
        profile=None,
        timeout=args.timeout,
    )


def table(cells: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| cell | checkpointing | dropout | batch | r | step ours / peer (s) | ratio"
        " | peak RSS ours / peer (MiB) | ratio | first loss ours / peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in cells.items():
        gc, dropout, batch, seq, r = CELLS[name]
        o, p, q = res["ours"], res["peer"], res["ratio_ours_over_peer"]
        lines.append(
            f"| {name} | {'on' if gc else 'off'} | {dropout} | {batch}x{seq} | {r}"
            f" | {o['median_step_s']:.3f} / {p['median_step_s']:.3f} | **{q['median_step_s']:.3f}**"
            f" | {o['peak_rss_mib']:.0f} / {p['peak_rss_mib']:.0f} | **{q['peak_rss_mib']:.3f}**"
            f" | {o['first_loss']:.6f} / {p['first_loss']:.6f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CELLS), help="cells to run (default: all)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=RESULTS / "matrix.json")
    parser.add_argument("--merge", action="store_true", help="keep --out's other cells; replace the ones run now")
    args = parser.parse_args(argv)
    from lightning_qlora.io.models import resolve_model_path

    model = resolve_model_path(args.model)
    start = loadavg()
    cells: dict[str, dict[str, Any]] = {}
    commands = [shlex.join([sys.executable, *sys.argv])]
    if args.merge and args.out.is_file():
        before = json.loads(args.out.read_text())
        cells, commands = before["results"], [*before.get("commands", [before["command"]]), *commands]
    for name in args.only or sorted(CELLS):
        print(f"cell {name}: checkpointing, dropout, batch, seq, r = {CELLS[name]}", flush=True)
        cells[name] = run_speed(cell_args(name, args), model, "cpu")
    cells = dict(sorted(cells.items()))
    keys = ("median_step_s", "peak_rss_mib")
    worst = {key: max(cells, key=lambda c, k=key: cells[c]["ratio_ours_over_peer"][k]) for key in keys}
    result = {
        "case": "matrix",
        "command": commands[-1],
        "commands": commands,
        "machine": machine_info(),
        "model": model,
        "settings": {"runs": args.runs, "steps": args.steps, "warmup": args.warmup, "threads": args.threads},
        "cells": {name: dict(zip(("gc", "dropout", "batch", "seq", "r"), CELLS[name], strict=True)) for name in cells},
        "targets": {"ratio": TARGET, "ceiling": CEILING},
        "worst": {key: {"cell": c, "ratio": cells[c]["ratio_ours_over_peer"][key]} for key, c in worst.items()},
        "loadavg_start": start,
        "loadavg_end": loadavg(),
        "results": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(cells))
    print(f"worst: {result['worst']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
