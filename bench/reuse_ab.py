"""A/B of ``CPUOptions(reuse_recompute=...)`` inside one process: alternate steps between stock and reusing layers.

    python bench/reuse_ab.py --pairs 10 --threads 2 --out bench/results/cpu-reuse-ab.json

Separate processes on a shared 2-core machine swing by 10-30% from run to run, more than the
effect measured here. One model trained with the 4-bit layers and LoRA dropouts switched
between bitsandbytes/PEFT's stock classes and ``lightning_qlora.cpu.recompute``'s on every step
sees the same machine state on both sides of each pair. The switch changes no result (the
losses are bit-identical, ``tests/cpu/test_recompute.py``), only the work per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import LORA, LR, RESULTS, loadavg, machine_info, random_batches  # noqa: E402


def _switch(model, reuse: bool) -> None:
    import bitsandbytes as bnb
    from torch import nn

    from lightning_qlora.cpu.recompute import ReplayDropout, _reuse_linear4bit

    layer = _reuse_linear4bit() if reuse else bnb.nn.Linear4bit
    dropout = ReplayDropout if reuse else nn.Dropout
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.__class__ = layer
        elif isinstance(module, nn.Dropout) and module.p > 0:
            module.__class__ = dropout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=10, help="stock/reuse step pairs (the first pair is untimed)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "cpu-reuse-ab.json"))
    args = parser.parse_args(argv)

    import torch

    from lightning_qlora import CausalLMModule, load_model, prepare
    from lightning_qlora.io.models import resolve_model_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    model = load_model(path)
    prepare(model, **LORA, gradient_checkpointing=True, verbose=False)
    module = CausalLMModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    batches = random_batches(model.config.vocab_size, 2 * args.pairs, args.batch, args.seq, 0)
    steps: dict[str, list[float]] = {"stock": [], "reuse": []}
    before = loadavg()
    for i, batch in enumerate(batches):
        # Alternate which side goes first in each pair (AB BA AB ...), so drift hits both alike.
        side = ("stock", "reuse")[(i + i // 2) % 2]
        _switch(model, side == "reuse")
        start = time.perf_counter()
        nll, count = module._loss_sums(batch)
        (nll / count.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps[side].append(time.perf_counter() - start)
        print(f"step {i} {side:5s} {steps[side][-1]:.3f} s", flush=True)
    timed = {side: times[1:] for side, times in steps.items()}
    ratios = [r / s for s, r in zip(timed["stock"], timed["reuse"], strict=True)]
    result = {
        "case": "reuse-ab",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "model": path,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "lora": LORA,
        "step_s": {side: [round(t, 4) for t in times] for side, times in steps.items()},
        "median_step_s": {side: round(statistics.median(times), 4) for side, times in timed.items()},
        "paired_ratios_reuse_over_stock": [round(r, 4) for r in ratios],
        "median_paired_ratio": round(statistics.median(ratios), 4),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    medians = result["median_step_s"]
    print(f"median step: stock {medians['stock']:.3f} s, reuse {medians['reuse']:.3f} s;")
    print(f"median paired ratio reuse/stock {result['median_paired_ratio']:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
