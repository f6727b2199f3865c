"""Predict a QLoRA training run's peak memory from the model config alone.

No weights are loaded: the model is built on the meta device to count its Linear layers,
and the rest is arithmetic. The activation formula is derived for Llama-style decoders
(RMSNorm, GQA attention through SDPA, SwiGLU MLP, PEFT LoRA) and checked tensor by tensor
against what autograd saves; ``bench/estimate_vs_measured.py`` compares the total with the
peak RSS of real CPU training steps.

The total predicts the steady-state training peak: a step with the optimizer states
already allocated. On CPU it is the peak RSS when freed memory goes back to the OS; with
glibc's default (dynamic) mmap threshold, freed activations stay resident and the RSS can
reach the no-checkpointing figure (see the bench results).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_qlora.app.estimate_activations import (
    ALLOCATORS,
    heap_resident,
    layer_grads_per_token,
    layer_saved_per_token,
)
from lightning_qlora.app.estimate_shape import ModelShape, describe, load_config
from lightning_qlora.core.adapters import ALL_LINEAR, AdapterConfig, checkpoint_every
from lightning_qlora.core.quantize import QuantConfig, parse_dtype, quantized_linear_bytes
from lightning_qlora.tasks.chunked_loss import AUTO_CHUNK, check_chunk_size

MiB = 2**20
GiB = 2**30
# RSS of a Python 3.11 process that imported torch 2.13 (CPU), transformers 5.2, bitsandbytes 0.50,
# peft 0.21 and lightning 2.6 and did nothing else: 430.6-430.8 MiB over three runs on x86_64 Linux
# (the llama modules and this package add ~1 MiB). A CUDA build of torch maps far more.
IMPORT_OVERHEAD = 431 * MiB
# What a Trainer.fit adds before its model counts: lazily imported modules (the model class,
# bitsandbytes' kernels), Lightning's loop and the heap the low-memory load leaves. RSS after
# setup minus the model's bytes, bench/results/estimate_vs_measured.json ("rss_setup_mib").
FIT_OVERHEAD = 96 * MiB
FRAMEWORK_OVERHEAD = IMPORT_OVERHEAD + FIT_OVERHEAD
# A padding-free row's block-causal mask (transformers' boolean mask and CPU sdpa's own conversions),
# per pair of the row's tokens: 7.9-9.0 B measured at 2,048-6,144 tokens, bench/results/padding-mask.json.
MASK_BYTES_PER_PAIR = 9
# Logits buffers larger than glibc's largest dynamic mmap threshold get their own mapping.
_MMAP_THRESHOLD_MAX = 32 * MiB
# Bytes of optimizer state per trainable parameter: AdamW keeps two fp32 moments; bitsandbytes'
# 8-bit AdamW keeps two uint8 moments plus an fp32 scale per 256-value block.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "paged_adamw_8bit": 2 + 8 / 256}


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training step, in bytes, by what holds it.

    ``activations`` and ``logits`` are what is alive at the peak moment: the start of the
    loss backward (three fp32 copies of the logits), or, with checkpointing and few scored
    positions, the recompute of one decoder layer (logits already freed).
    """

    overhead: int
    base_weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    setup_peak: int
    peak_at: str
    notes: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        """Predicted peak bytes of a training step."""
        return (
            self.overhead
            + self.base_weights
            + self.adapters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
        )

    def parts(self) -> dict[str, int]:
        """The breakdown by name, in bytes."""
        names = ("overhead", "base_weights", "adapters", "gradients", "optimizer", "activations", "logits")
        return {name: getattr(self, name) for name in names}

    def table(self) -> str:
        """The breakdown as aligned text lines, in MiB."""
        rows = [
            ("framework overhead", self.overhead),
            ("base weights", self.base_weights),
            ("adapters", self.adapters),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
        ]
        lines = [f"{'':<20}{'MiB':>10}"]
        for label, value in rows:
            note = self.notes.get(label.split()[0], "")
            lines.append(f"{label:<20}{value / MiB:>10.1f}  {note}".rstrip())
        lines.append(f"{'total':<20}{self.total / MiB:>10.1f}  peak at {self.peak_at}")
        lines.append(f"(loading and quantizing the weights peaks near {self.setup_peak / MiB:.1f} MiB)")
        return "\n".join(lines)


def estimate_memory(
    config: object,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    r: int = 16,
    target: str | tuple[str, ...] = ALL_LINEAR,
    lora_dropout: float = 0.05,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool | int = True,
    compute_dtype: str | torch.dtype = torch.float32,
    optimizer: str = "adamw",
    answer_tokens: int | None = None,
    overhead_bytes: int | None = None,
    allocator: str = "glibc",
    low_memory: bool = True,
    loss_chunk_size: int | str | None = "auto",
    reentrant: bool = True,
    offload_activations: bool = False,
    padding_free: bool = False,
) -> MemoryEstimate:
    """Predict the peak memory of a QLoRA training step, from the model config only.

    Args:
        config: A ``PretrainedConfig``, a model directory, a ``config.json`` path, or the default's name.
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        double_quant: Quantize the 4-bit block scales too.
        r: LoRA rank.
        target: LoRA targets, as ``AdapterConfig.target_modules``.
        lora_dropout: LoRA dropout; above 0 every adapter keeps a mask and a dropped copy of its input.
        batch_size: Micro batch (sequences per forward).
        seq_len: Tokens per sequence (padded length).
        gradient_checkpointing: Keep only each layer's input and recompute the rest in backward;
            ``k``: every k-th layer only, as ``AdapterConfig``.
        compute_dtype: Activation dtype: fp32 on CPU, bf16/fp16 on GPU.
        optimizer: ``"adamw"`` or ``"paged_adamw_8bit"``.
        answer_tokens: Positions per sequence that go through the head (the scored answer);
            ``None`` scores all ``seq_len - 1``.
        overhead_bytes: Fixed process overhead; defaults to :data:`FRAMEWORK_OVERHEAD` (CPU RSS).
        allocator: ``"glibc"``: CPU training with glibc's default malloc (``CPUOptions()``), whose heap
            keeps a step's freed activations resident; ``"returning"``: memory is reused as it is freed
            (GPU, or ``CPUOptions(mmap_threshold=65536)``). See ``estimate_activations``.
        low_memory: The model is quantized while loading (the default); ``False``: loaded in fp32 first.
        loss_chunk_size: ``CausalLMModule(loss_chunk_size=...)``: the head and the loss run over this
            many scored tokens at a time; ``None``: all at once; ``"auto"`` (the module's default): 1024.
        reentrant: Checkpointing runs reentrant, as ``QLoRAPlugin`` runs it on CPU in one process
            (``CPUOptions.reentrant_checkpoint``); ``False``: non-reentrant (DDP, FSDP). glibc only.
        offload_activations: ``AdapterConfig(offload_activations=True)``: checkpointed layers' inputs
            wait in host memory, one at a time back on the accelerator for its backward. Counted for
            the ``"returning"`` allocator (accelerators); on CPU it moves nothing.
        padding_free: ``data.packing=padding_free``: the batch's examples run end to end in one row
            of ``batch_size x seq_len`` tokens (``seq_len``: their mean length), and attention builds
            a block-causal mask over that row, :data:`MASK_BYTES_PER_PAIR` per pair of its tokens.

    Returns:
        A :class:`MemoryEstimate`; ``.total`` is the predicted peak, ``.table()`` the breakdown.

    Raises:
        ValueError: unreadable or unsupported config, or a non-positive size.
    """
    shape = config if isinstance(config, ModelShape) else describe(load_config(config), target)
    for label, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} should be a positive integer, but got {label}={value!r}.")
    positions = seq_len - 1 if answer_tokens is None else answer_tokens
    if isinstance(positions, bool) or not isinstance(positions, int) or not 1 <= positions <= seq_len:
        raise ValueError(
            f"answer_tokens={answer_tokens!r} should be between 1 and seq_len={seq_len}; use None to score all."
        )
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer={optimizer!r} is unknown; use one of: {', '.join(OPTIMIZER_STATE_BYTES)}.")
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator={allocator!r} is unknown; use one of: {', '.join(ALLOCATORS)}.")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout should be in [0, 1), but got {lora_dropout!r}; try 0.05.")
    dtype = parse_dtype(compute_dtype, "compute_dtype", (torch.float32, torch.bfloat16, torch.float16))
    QuantConfig(quant_type, double_quant, dtype)  # the same checks as a real run (e.g. no int8 with bf16)
    # The adapter's own rules (e.g. offloading needs checkpointing), checked as a real run checks them.
    AdapterConfig(r=r, gradient_checkpointing=gradient_checkpointing, offload_activations=offload_activations)
    a = torch.finfo(dtype).bits // 8

    quantized = sum(quantized_linear_bytes(o, i, quant_type, double_quant) for o, i, _ in shape.quantized)
    biases = sum(o for o, _, has_bias in shape.quantized if has_bias) * a
    # Embeddings and heads are cast to the compute dtype; norms stay fp32 (adapters._prepare_for_kbit_training).
    base = quantized + biases + shape.other_params * a + shape.norm_params * 4
    trainable = sum(r * (i + o) for _, _, i, o in shape.lora)
    adapters = gradients = 4 * trainable
    states = int(OPTIMIZER_STATE_BYTES[optimizer] * trainable)

    tokens = batch_size * seq_len
    per_layer_adapters: dict[int, list[tuple[str, int]]] = {k: [] for k in range(shape.n_layers)}
    for index, leaf, width, _ in shape.lora:
        per_layer_adapters.setdefault(index, []).append((leaf, width))
    dims = (
        shape.hidden,
        shape.intermediate,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
        shape.heads,
    )
    every = checkpoint_every(gradient_checkpointing)
    checkpointed = [every > 0 and k % every == 0 for k in range(shape.n_layers)]
    # Inside checkpointed blocks the CPU fast path keeps dropout masks at one bit per element.
    per_layer = [
        (
            layer_saved_per_token(dims, per_layer_adapters[k], r, lora_dropout, a),
            layer_saved_per_token(
                dims, per_layer_adapters[k], r, lora_dropout, a, packed_masks=checkpointed[k] and allocator == "glibc"
            ),
            layer_grads_per_token(dims, per_layer_adapters[k], a),
        )
        for k in range(shape.n_layers)
    ]
    layers = [f for f, _, _ in per_layer]
    # Every layer's input and the last output stay for backward (checkpointed or not), and RoPE's cos/sin.
    kept = tokens * ((shape.n_layers + 1) * shape.hidden + 2 * shape.head_dim) * a
    mask = MASK_BYTES_PER_PAIR * tokens**2 if padding_free else 0
    kept += mask
    # bitsandbytes dequantizes one weight at a time for its matmul.
    workspace = max((o * i for o, i, _ in shape.quantized), default=0) * a
    check_chunk_size(loss_chunk_size)
    chunk = AUTO_CHUNK if loss_chunk_size == "auto" else loss_chunk_size
    scored = batch_size * positions
    at_once = scored if chunk is None else min(scored, chunk)
    if chunk is None:
        # Forward keeps the log-softmax; its backward holds that, the incoming and the outgoing gradient,
        # all fp32 (16-bit logits are cast up first). The hidden states at scored positions are gathered.
        logits = 3 * at_once * shape.vocab * 4 + (at_once * shape.vocab * a if a != 4 else 0)
    else:
        # Two fp32 buffers for a chunk (logits, log-probabilities turned into their gradient in place);
        # 16-bit: plus the head's 16-bit output and the gradient cast back for the matmul.
        logits = 2 * at_once * shape.vocab * 4 + (2 * at_once * shape.vocab * a if a != 4 else 0)
    offloaded = 0
    if allocator == "glibc":
        # Logits up to the mmap threshold sit on the heap and stay; larger ones are mapped while alive.
        # Either way they add to the heap at the loss backward, the step's peak.
        where = "mapped" if at_once * shape.vocab * 4 > _MMAP_THRESHOLD_MAX else "on the heap"
        activations = kept + workspace + heap_resident(per_layer, tokens, checkpointed, reentrant)
        peak_at = "loss backward, on a heap holding a step's activations" + (
            " (recomputed)" if all(checkpointed) else " and their gradients"
        )
        logits_note = f"logits {where}"
    else:
        if offload_activations:
            # Checkpointed layers' inputs go to host memory; the backward brings back one at a time.
            offloaded = max(sum(checkpointed) - 1, 0) * tokens * shape.hidden * a
            kept -= offloaded
        # Layers outside checkpointing keep their saved tensors until the backward reaches them.
        kept += tokens * sum(f for f, c in zip(layers, checkpointed, strict=True) if not c)
        at_loss = kept + workspace + scored * shape.hidden * a
        peak_at, activations, logits_note = "loss backward", at_loss, ""
        if any(checkpointed):
            # Backward recomputes one layer at a time; the gradients flowing through it are transient.
            widest = max(f for f, c in zip(layers, checkpointed, strict=True) if c)
            recompute = kept + workspace + tokens * (widest + (2 * shape.intermediate + 2 * shape.hidden) * a)
            if recompute > at_loss + logits:
                peak_at, activations, logits = "recompute of one checkpointed layer", recompute, 0
    n_quantized = sum(o * i for o, i, _ in shape.quantized)
    notes = {
        "framework": "python + torch + transformers + bitsandbytes + peft + lightning (CPU RSS)",
        "base": f"{n_quantized / 1e6:.1f}M params in {quant_type}"
        + (" + double quant" if double_quant and quant_type != "int8" else "")
        + f", {(shape.other_params + shape.norm_params) / 1e6:.1f}M unquantized",
        "adapters": f"{trainable / 1e6:.2f}M trainable fp32 (r={r}, {len(shape.lora)} layers)",
        "optimizer": optimizer,
        "activations": ("padding-free, " if padding_free else "")
        + f"batch {batch_size} x seq {seq_len}, {str(dtype).removeprefix('torch.')}, checkpointing "
        + ("on" if every == 1 else "off" if every == 0 else f"every {every} layers")
        + f", {allocator} allocator"
        + (
            ""
            if not offload_activations
            else ", layer inputs offloaded: nothing moves on CPU"
            if allocator == "glibc"
            else f", {offloaded / 2**20:,.0f} MiB of layer inputs offloaded to host memory"
        )
        + (f", {mask / 2**20:,.0f} MiB of block-causal mask" if padding_free else ""),
        "logits": (
            f"3 fp32 copies{'' if a == 4 else ' (+1 16-bit)'}"
            if chunk is None
            else f"2 fp32 buffers{'' if a == 4 else ' (+2 16-bit)'}"
        )
        + f" of {at_once:,} positions x {shape.vocab:,} vocab"
        + (f" (chunks of {chunk:,})" if at_once < scored else "")
        + (f", {logits_note}" if logits_note else "")
        if logits
        else "freed by then",
    }
    overhead = FRAMEWORK_OVERHEAD if overhead_bytes is None else overhead_bytes
    # Quantizing while loading holds the base built so far, the adapters, and one fp32 weight with
    # its quantization temporaries (about three times its size).
    setup_low_memory = base + adapters + 3 * max((o * i for o, i, _ in shape.quantized), default=0) * 4
    return MemoryEstimate(
        overhead=overhead,
        base_weights=base,
        adapters=adapters,
        gradients=gradients,
        optimizer=states,
        activations=int(activations),
        logits=int(logits),
        setup_peak=overhead + (setup_low_memory if low_memory else 4 * shape.total_params),
        peak_at=peak_at,
        notes=notes,
    )


def auto_batch_size(config: object, budget_bytes: int, seq_len: int, effective_batch: int, **kw) -> tuple[int, int]:
    """The largest micro batch that fits ``budget_bytes``, and the accumulation that restores ``effective_batch``.

    Micro batches are the divisors of ``effective_batch``, so ``micro * accumulation == effective_batch``.

    Args:
        config: As in :func:`estimate_memory`.
        budget_bytes: Memory available to the run (total, overhead included).
        seq_len: Tokens per sequence.
        effective_batch: Sequences per optimizer step.
        **kw: Other :func:`estimate_memory` arguments (``quant_type``, ``r``, ``target``...).

    Returns:
        ``(micro_batch, grad_accumulation)``.

    Raises:
        ValueError: even a micro batch of 1 does not fit, or a size is not positive.
    """
    if isinstance(effective_batch, bool) or not isinstance(effective_batch, int) or effective_batch < 1:
        raise ValueError(f"effective_batch should be a positive integer, but got {effective_batch!r}.")
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes should be positive, but got {budget_bytes!r}.")
    # Count the model once; each candidate is then arithmetic.
    shape = describe(load_config(config), kw.pop("target", ALL_LINEAR))
    need = None
    for micro in sorted((d for d in range(1, effective_batch + 1) if effective_batch % d == 0), reverse=True):
        need = estimate_memory(shape, batch_size=micro, seq_len=seq_len, **kw).total
        if need <= budget_bytes:
            return micro, effective_batch // micro
    raise ValueError(
        f"budget {budget_bytes / GiB:.1f} GiB cannot be met: batch 1 needs {need / GiB:.1f} GiB;"
        " raise the budget or lower seq_len."
    )
