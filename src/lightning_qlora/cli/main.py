"""``lightning-qlora train|merge|generate|evaluate|estimate``: QLoRA fine-tuning, and the adapter's life after.

``python -m lightning_qlora ...`` is the same command. ``train`` takes Hydra overrides
(``lightning-qlora train --help`` lists them). Bad input prints one ``error: ...`` line and exits 2;
``LIGHTNING_QLORA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
from pathlib import Path

# The configs that ship in the package; in a checkout's editable install, the checkout's conf/.
CONF_DIR = Path(str(importlib.resources.files("lightning_qlora.conf")))


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    # Parsed by Hydra (main() hands it the arguments); listed here for --help.
    sub.add_parser("train", help="fine-tune: lightning-qlora train recipe=medical trainer.max_steps=30", add_help=False)

    m = sub.add_parser("merge", help="merge an adapter into its dequantized base; save a plain 16-bit model")
    m.add_argument("--adapter", required=True, help="exported adapter directory (a run's adapter/)")
    m.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    m.add_argument("--output", required=True, help="directory for the merged model")
    m.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    m.add_argument("--force", action="store_true", help="replace a model already at --output")

    g = sub.add_parser("generate", help="generate from a base plus adapter (quantized), or a merged model")
    g.add_argument("--adapter", help="adapter directory; omit for a merged or plain model")
    g.add_argument("--base", help="base or merged model (default: the adapter's base, else the embedded default)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--system", help="system message for the chat template")

    e = sub.add_parser("evaluate", help="score an adapter on a recipe's split with the recipe's metrics")
    e.add_argument("--adapter", required=True)
    e.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    e.add_argument("--recipe", help="recipe name (default: the one the adapter was trained with)")
    e.add_argument("--split", default="test", choices=("test", "validation"))
    e.add_argument("--output", help="also write the metrics as JSON here")
    e.add_argument("overrides", nargs="*", help="config overrides such as data.path=rows.jsonl")

    sub.add_parser("estimate", help="predict a run's peak memory from the model config", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    prog = _prog()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from lightning_qlora.cli.train import run_cli

        run_cli(argv[1:], prog=f"{prog} train")  # exits with Hydra's or the run's status
        return 0
    try:
        if argv and argv[0] == "estimate":
            from lightning_qlora.cli.estimate import main as estimate_main

            return estimate_main([_ESTIMATE_KEYS.get(a.split("=", 1)[0], a) for a in _split_keys(argv[1:])])
        args = _parser(prog).parse_args(argv)
        if args.command == "merge":
            from lightning_qlora.app.merge import merge

            out = merge(args.adapter, args.output, base=args.base, dtype=args.dtype, force=args.force)
            print(f"merged model written to {out}")
            return 0
        if args.command == "generate":
            return _generate(args)
        return _evaluate(args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        if os.environ.get("LIGHTNING_QLORA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _prog() -> str:
    """How the user called us, for usage lines: the console script, or ``python -m``."""
    name = Path(sys.argv[0]).name if sys.argv else ""
    return "lightning-qlora" if name.startswith("lightning-qlora") else "python -m lightning_qlora"


# The run config's keys, accepted by `estimate` too: model.name_or_path=X is --model X.
_ESTIMATE_KEYS = {
    "model.name_or_path": "--model",
    "data.batch_size": "--batch-size",
    "data.max_length": "--seq-len",
    "adapter.r": "--r",
    "quant.type": "--quant",
}


def _split_keys(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in _ESTIMATE_KEYS:
            out += [key, value]
        else:
            out.append(arg)
    return out


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist; pass a text file with one prompt per line.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given; pass --prompt TEXT or --prompts-file FILE.")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from lightning_qlora.app.generate import stream_answers

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} should be >= 1.")
    stream_answers(_prompts(args), args.adapter, args.base, args.max_new_tokens, args.system)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lightning_qlora.app.evaluate import evaluate_saved_adapter

    metrics = evaluate_saved_adapter(args.adapter, args.recipe, args.overrides, args.base, args.split)
    print(json.dumps(metrics, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0
