"""What a padding-free row's attention mask costs: the estimator's bytes per token pair.

    python bench/padding_mask.py                  # T = 2048, 4096, 6144; writes bench/results/padding-mask.json

A padding-free batch is one row of T tokens whose position ids restart at each example, with no mask
tensor. transformers then builds a block-causal mask over the row, and torch's CPU sdpa takes it
with its own conversions: memory that grows with T^2 and that a single causal sequence of the same
T tokens (``is_causal``) does not need. Each point is two fresh processes (a tiny 2-layer Llama at
sdpa: little else grows with T): one forward and backward over a row of two packed examples, and
one over one example of the same length. The difference of their peak RSS rises, divided by T^2,
is ``app/estimate.py``'s ``MASK_BYTES_PER_PAIR``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine_info  # noqa: E402


def child(mode: str, tokens: int) -> float:
    """Peak RSS rise (MiB) of one forward and backward over ``tokens`` tokens, packed or not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=2 * tokens,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (1, tokens))
    half = tokens // 2  # two examples end to end: positions restart halfway
    packed = torch.cat([torch.arange(half), torch.arange(tokens - half)])
    positions = torch.arange(tokens) if mode == "single" else packed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(input_ids=ids, position_ids=positions.unsqueeze(0), labels=ids, use_cache=False).loss.backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 6144])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    points: list[dict[str, Any]] = []
    for tokens in args.tokens:
        rise = {}
        for mode in ("packed", "single"):
            cmd = [sys.executable, __file__, "--child", mode, str(tokens)]
            rise[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        pair_bytes = (rise["packed"] - rise["single"]) * 2**20 / tokens**2
        points.append({"tokens": tokens, "peak_rise_mib": rise, "bytes_per_token_pair": round(pair_bytes, 2)})
        print(
            f"T={tokens}: packed +{rise['packed']:.1f} MiB, single +{rise['single']:.1f} MiB, {pair_bytes:.2f} B/pair"
        )
    out = RESULTS / "padding-mask.json"
    result = {"case": "padding-mask", "command": "python " + " ".join(sys.argv), "machine": machine_info()}
    out.write_text(json.dumps({**result, "points": points}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
