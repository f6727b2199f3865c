"""Cost growth: ours vs the peer stack against sequence length and against model size.

    python bench/scaling.py                      # both axes, 1 run x 4 steps (2 timed) per side and point
    python bench/scaling.py --axis seq --runs 3
    python bench/scaling.py --axis model --runs 2 --steps 7 --warmup 4 --merge  # keep the seq axis in --out

At 1.7B the heap needs about 5 steps to settle (bench/README.md, "Cost growth"), hence the model
axis' longer warm-up.

``seq``: the embedded SmolLM2-135M at batch 1 x 128, 512, 1024 and 2048 tokens. ``model``: the
real 135M plus random-weight SmolLM2-360M and SmolLM2-1.7B shapes (written once, bf16, under
``--models``) at batch 1 x 128. Each point is ``bench/run.py``'s measurement (fresh workers, sides
alternating), with the defaults users get: checkpointing on, LoRA r=16, dropout 0.05, fp32
compute. Writes ``bench/results/scaling.json`` and ``bench/results/scaling.png``.
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
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, loadavg, machine_info  # noqa: E402
from bench.matrix import cell_args  # noqa: E402
from bench.random_model import is_checkpoint  # noqa: E402
from bench.run import run_speed  # noqa: E402

SEQS = (128, 512, 1024, 2048)
MODEL_SEQ = 128
# SmolLM2 shapes (the HuggingFaceTB configs): tied embeddings, a 49,152-token vocabulary.
SHAPES = {
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, rope_theta=100000.0),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, rope_theta=130000.0),
}  # fmt: skip
SLACK = 0.05  # issue 20: the ratio at the largest point may exceed the smallest's by this much


def model_dirs(root: Path) -> dict[str, str]:
    from lightning_qlora.io.models import resolve_model_path

    dirs = {"smollm2-135m": str(resolve_model_path("smollm2-135m-instruct"))}
    for name, shape in SHAPES.items():
        full = dict(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, **shape)
        dirs[name] = str(root / name)
        if not is_checkpoint(root / name):
            # In a child: a worker's ru_maxrss starts at this process's RSS when it forks, so this
            # process must never hold a model's shards.
            code = "import sys, json; from bench.random_model import write_random_llama as w;"
            code += " w(sys.argv[1], json.loads(sys.argv[2]), shard_bytes=2 << 30)"
            subprocess.run([sys.executable, "-c", code, dirs[name], json.dumps(full)], cwd=ROOT, check=True)
    return dirs


def point(model: str, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    cell = cell_args("A", args)  # checkpointing on, dropout 0.05, r=16
    cell.batch, cell.seq, cell.case = 1, seq, "scaling"
    res = run_speed(cell, model, "cpu")
    o, p = res["ours"], res["peer"]
    return {
        "seq": seq,
        "ours_step_ms_per_token": 1000 * o["median_step_s"] / seq,
        "peer_step_ms_per_token": 1000 * p["median_step_s"] / seq,
        "ours_peak_rss_mib": o["peak_rss_mib"],
        "peer_peak_rss_mib": p["peak_rss_mib"],
        "step_ratio": res["ratio_ours_over_peer"]["median_step_s"],
        "rss_ratio": res["ratio_ours_over_peer"]["peak_rss_mib"],
        "first_loss": [o["first_loss"], p["first_loss"]],
        "result": res,
    }


def growth(points: list[dict[str, Any]]) -> dict[str, Any]:
    first, last = points[0], points[-1]
    return {
        key: {"first": first[key], "last": last[key], "met": last[key] <= first[key] + SLACK}
        for key in ("step_ratio", "rss_ratio")
    }


def run_info(args: argparse.Namespace) -> dict[str, Any]:
    """The command and settings of one axis' run: axes merged from two runs keep their own."""
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {k: getattr(args, k) for k in ("runs", "steps", "warmup", "threads")},
        "git": machine_info()["git"],
        "loadavg_end": loadavg(),
    }


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_found = [a for a in ("seq", "model") if a in result["axes"]]
    fig, axes = plt.subplots(2, len(axes_found), figsize=(5.5 * len(axes_found), 7), squeeze=False)
    for col, axis in enumerate(axes_found):
        pts = result["axes"][axis]["points"]
        xs = [p["seq"] if axis == "seq" else p["model"] for p in pts]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(xs, [p["ours_step_ms_per_token"] for p in pts], "o-", label="ours")
        top.plot(xs, [p["peer_step_ms_per_token"] for p in pts], "s--", label="peer (transformers+bnb+PEFT)")
        top.set_ylabel("step time per token (ms)")
        bottom.plot(xs, [p["step_ratio"] for p in pts], "o-", label="step ours/peer")
        bottom.plot(xs, [p["rss_ratio"] for p in pts], "s-", label="peak RSS ours/peer")
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.set_ylabel("ours / peer")
        for ax in (top, bottom):
            ax.set_xlabel(
                "sequence length (batch 1, SmolLM2-135M)" if axis == "seq" else f"model (batch 1 x {MODEL_SEQ})"
            )
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axis", choices=("seq", "model", "both"), default="both")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--models", type=Path, default=Path.home() / ".cache" / "lightning_qlora" / "bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    parser.add_argument("--merge", action="store_true", help="keep --out's other axis; replace the one run now")
    args = parser.parse_args(argv)
    dirs = model_dirs(args.models)
    axes: dict[str, Any] = {}
    if args.merge and args.out.is_file():
        axes = json.loads(args.out.read_text())["axes"]
    if args.axis in ("seq", "both"):
        pts = []
        for seq in SEQS:
            print(f"seq {seq}", flush=True)
            pts.append(point(dirs["smollm2-135m"], seq, args))
        axes["seq"] = {"points": pts, "growth": growth(pts), **run_info(args)}
    if args.axis in ("model", "both"):
        pts = []
        for name, folder in dirs.items():
            print(f"model {name}", flush=True)
            pts.append({"model": name, **point(folder, MODEL_SEQ, args)})
        axes["model"] = {"points": pts, "growth": growth(pts), **run_info(args)}
    result = {
        "case": "scaling",
        "machine": machine_info(),
        "axes": axes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for axis, data in axes.items():
        for p in data["points"]:
            label = p.get("model", p["seq"])
            print(
                f"{axis} {label}: ms/token ours {p['ours_step_ms_per_token']:.2f}"
                f" peer {p['peer_step_ms_per_token']:.2f}"
                f" (step {p['step_ratio']:.3f}), RSS {p['ours_peak_rss_mib']:.0f}/{p['peer_peak_rss_mib']:.0f} MiB"
                f" ({p['rss_ratio']:.3f})"
            )
        print(f"{axis} growth: {data['growth']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
