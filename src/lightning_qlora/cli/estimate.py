"""``lightning-qlora estimate``: a run's peak memory from the model config, before loading weights.

    lightning-qlora estimate --model smollm2-135m-instruct --batch-size 4 --seq-len 512
    lightning-qlora estimate --model path/to/config.json --batch-size 32 --seq-len 1024 --budget 8

With ``--budget``, ``--batch-size`` is the effective batch, split into the largest micro batch
that fits and the gradient accumulation that restores it. Bad input raises ``ValueError``
(``lightning-qlora`` prints it as one ``error:`` line).
"""

from __future__ import annotations

import argparse

from lightning_qlora import DEFAULT_MODEL


def _chunk(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, none or a positive number of tokens")
    return int(text)


def _every(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of layers >= 1, e.g. 2")
    return int(text)


def _checkpointing(args: argparse.Namespace) -> bool | int:
    if args.no_gradient_checkpointing:
        return False
    return True if args.checkpoint_every is None else args.checkpoint_every


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-qlora estimate", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model directory, its config.json, or {DEFAULT_MODEL!r} (default; converted once on first use)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="micro batch; with --budget, the effective batch")
    parser.add_argument("--seq-len", type=int, default=384, help="tokens per sequence (padded length)")
    parser.add_argument("--answer-tokens", type=int, help="scored positions per sequence (default: all)")
    parser.add_argument(
        "--loss-chunk-size",
        type=_chunk,
        default="auto",
        help="scored tokens per chunk of the loss, 'auto' (CausalLMModule's default) or 'none' (all at once)",
    )
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--quant", default="nf4", choices=("nf4", "fp4", "int8"))
    parser.add_argument("--no-double-quant", action="store_true", help="keep fp32 4-bit block scales")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--checkpoint-every", type=_every, metavar="K", help="checkpoint every K-th layer (gradient_checkpointing=K)"
    )
    parser.add_argument("--compute-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument(
        "--offload-activations",
        action="store_true",
        help="checkpointed layers' inputs wait in host memory (adapter.offload_activations; GPUs only)",
    )
    parser.add_argument(
        "--padding-free",
        action="store_true",
        help="each micro batch is one row of batch-size x seq-len tokens (data.packing=padding_free)",
    )
    parser.add_argument("--budget", type=float, metavar="GiB", help="memory budget: print the micro batch that fits")
    return parser


# How far measured peaks fell from the estimate, through QLoRAPlugin + Trainer on CPU with the default
# allocator policy (every config within this band: bench/results/estimate_vs_measured.json).
ERROR_BAND = 0.15
RESULTS = "bench/results/estimate_vs_measured.json"


def band(peak: int, cpu: bool) -> str:
    """The predicted peak with the band that measurements fell in; unmeasured off CPU."""
    gib = 2**30
    if not cpu:
        return f"peak {peak / gib:.1f} GiB (16-bit compute: the CPU error band ({RESULTS}) was not measured on GPUs)"
    low, high = peak / (1 + ERROR_BAND) / gib, peak / (1 - ERROR_BAND) / gib
    return f"peak {peak / gib:.1f} GiB (measured within ±{ERROR_BAND:.0%}: {low:.1f}-{high:.1f} GiB on CPU, {RESULTS})"


def main(argv: list[str] | None = None) -> int:
    """Print the estimate table (and the batch split with ``--budget``); returns the exit code."""
    from lightning_qlora.app.estimate import GiB, auto_batch_size, estimate_memory, load_config

    args = _parser().parse_args(argv)
    config = load_config(args.model)
    options = dict(
        quant_type=args.quant,
        double_quant=not args.no_double_quant,
        r=args.r,
        gradient_checkpointing=_checkpointing(args),
        compute_dtype=args.compute_dtype,
        answer_tokens=args.answer_tokens,
        loss_chunk_size=args.loss_chunk_size,
        offload_activations=args.offload_activations,
        padding_free=args.padding_free,
        # fp32 compute is the CPU path, with glibc's heap; 16-bit compute runs on a GPU, whose caching
        # allocator reuses what it frees.
        allocator="glibc" if args.compute_dtype == "fp32" else "returning",
    )
    batch = args.batch_size
    if args.budget is not None:
        if not args.budget > 0:
            raise ValueError(f"--budget={args.budget} should be a positive number of GiB, e.g. --budget 8.")
        batch, accumulation = auto_batch_size(config, int(args.budget * GiB), args.seq_len, args.batch_size, **options)
        print(
            f"budget {args.budget:g} GiB: micro batch {batch} x gradient accumulation {accumulation}"
            f" = effective batch {args.batch_size}"
        )
    estimate = estimate_memory(config, batch_size=batch, seq_len=args.seq_len, **options)
    name = getattr(config, "name_or_path", "") or args.model
    print(f"{name} ({config.model_type}, {config.num_hidden_layers} layers), batch {batch} x seq {args.seq_len}:")
    print(estimate.table())
    print(band(max(estimate.total, estimate.setup_peak), args.compute_dtype == "fp32"))
    return 0
