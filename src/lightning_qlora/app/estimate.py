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

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_qlora.core.adapters import ALL_LINEAR, AdapterConfig, resolve_targets
from lightning_qlora.core.quantize import QuantConfig, head_names, parse_dtype, quantized_linear_bytes

MiB = 2**20
GiB = 2**30
# RSS of a Python 3.11 process that imported torch 2.13 (CPU), transformers 5.2, bitsandbytes 0.50,
# peft 0.21 and lightning 2.6 and did nothing else: 430.6-430.8 MiB over three runs on x86_64 Linux
# (the llama modules and this package add ~1 MiB). A CUDA build of torch maps far more.
FRAMEWORK_OVERHEAD = 431 * MiB
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Bytes of optimizer state per trainable parameter: AdamW keeps two fp32 moments; bitsandbytes'
# 8-bit AdamW keeps two uint8 moments plus an fp32 scale per 256-value block.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "paged_adamw_8bit": 2 + 8 / 256}
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# With no dropout, adapters on layers that read the same tensor keep that one tensor.
_SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}


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
        lines.append(f"(loading the fp32 weights before quantizing peaks near {self.setup_peak / MiB:.1f} MiB)")
        return "\n".join(lines)


def load_config(model: object):
    """A ``PretrainedConfig`` from a config, a model directory, a ``config.json`` file or the default's name.

    Raises:
        ValueError: nothing there has a config, or its ``model_type`` is not supported.
    """
    from transformers import AutoConfig, PretrainedConfig

    from lightning_qlora.io.models import DEFAULT_MODEL, resolve_model_path

    if isinstance(model, PretrainedConfig):
        config = model
    else:
        name = str(model)
        path = Path(name).expanduser()
        try:
            # A config.json file loads as is; a directory must hold one; the default's name converts once.
            config = AutoConfig.from_pretrained(str(path) if path.is_file() else resolve_model_path(name))
        except (OSError, ValueError, KeyError) as err:
            first = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
            raise ValueError(
                f"cannot read a model config from {name!r} ({first}); pass a model directory, its config.json,"
                f" or {DEFAULT_MODEL!r}."
            ) from err
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported by the estimator; it knows Llama-style decoders:"
            f" {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return config


@dataclass(frozen=True)
class _Shape:
    """What the estimate needs from the model, counted once on the meta device."""

    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    quantized: tuple[tuple[int, int, bool], ...]  # (out, in, has_bias) per quantized Linear
    other_params: int  # unquantized weights other than norms: embeddings, untied head, skipped Linears
    norm_params: int
    total_params: int
    lora: tuple[tuple[int, str, int, int], ...]  # (layer index, leaf name, in, out) per adapter


def _describe(config, target: str | tuple[str, ...]) -> _Shape:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    heads = head_names(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n: m for n, m in linears.items() if not any(n == h or n.startswith(h + ".") for h in heads)}
    quantized_params = {id(m.weight) for m in quantized.values()} | {
        id(m.bias) for m in quantized.values() if m.bias is not None
    }
    other = norms = 0
    seen: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for param in module.parameters(recurse=False):
            if id(param) in seen or id(param) in quantized_params:
                continue
            seen.add(id(param))
            if is_norm:
                norms += param.numel()
            else:
                other += param.numel()
    lora = []
    for name in resolve_targets(model, AdapterConfig(target_modules=target)):
        match = _LAYER_INDEX.search(name)
        linear = linears[name]
        lora.append(
            (int(match.group(1)) if match else -1, name.rsplit(".", 1)[-1], linear.in_features, linear.out_features)
        )
    return _Shape(
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        vocab=config.vocab_size,
        quantized=tuple((m.out_features, m.in_features, m.bias is not None) for m in quantized.values()),
        other_params=other,
        norm_params=norms,
        total_params=sum(p.numel() for p in model.parameters()),
        lora=tuple(lora),
    )


def _layer_bytes_per_token(shape: _Shape, adapters: list[tuple[str, int]], r: int, dropout: float, a: int) -> float:
    """Bytes autograd saves per token inside one decoder layer (its input excluded)."""
    h, i, nh = shape.hidden, shape.intermediate, shape.heads
    q, kv = nh * shape.head_dim, shape.kv_heads * shape.head_dim
    # q and k after RoPE, v, the attention output, the post-attention residual (norm input),
    # gate, SiLU(gate) and up; plus fp32 log-sum-exp per head and the two norms' 1/rms.
    saved = (2 * q + 2 * kv + h + 3 * i) * a + (nh + 2) * 4
    if dropout > 0:
        # Each adapter keeps its own dropout mask (a float tensor on CPU) and dropped input.
        saved += sum(2 * width for _, width in adapters) * a
    else:
        # lora_A keeps its input: shared by q/k/v and by gate/up; o_proj's is the attention output.
        inputs = {_SHARED_INPUT.get(leaf, leaf): width for leaf, width in adapters if leaf != "o_proj"}
        saved += sum(inputs.values()) * a
    return saved + len(adapters) * r * a


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
    gradient_checkpointing: bool = True,
    compute_dtype: str | torch.dtype = torch.float32,
    optimizer: str = "adamw",
    answer_tokens: int | None = None,
    overhead_bytes: int | None = None,
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
        gradient_checkpointing: Keep only each layer's input and recompute the rest in backward.
        compute_dtype: Activation dtype: fp32 on CPU, bf16/fp16 on GPU.
        optimizer: ``"adamw"`` or ``"paged_adamw_8bit"``.
        answer_tokens: Positions per sequence that go through the head (the scored answer);
            ``None`` scores all ``seq_len - 1``.
        overhead_bytes: Fixed process overhead; defaults to :data:`FRAMEWORK_OVERHEAD` (CPU RSS).

    Returns:
        A :class:`MemoryEstimate`; ``.total`` is the predicted peak, ``.table()`` the breakdown.

    Raises:
        ValueError: unreadable or unsupported config, or a non-positive size.
    """
    shape = config if isinstance(config, _Shape) else _describe(load_config(config), target)
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
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout should be in [0, 1), but got {lora_dropout!r}; try 0.05.")
    dtype = parse_dtype(compute_dtype, "compute_dtype", (torch.float32, torch.bfloat16, torch.float16))
    QuantConfig(quant_type, double_quant, dtype)  # the same checks as a real run (e.g. no int8 with bf16)
    AdapterConfig(r=r)
    a = torch.finfo(dtype).bits // 8

    quantized = sum(quantized_linear_bytes(o, i, quant_type, double_quant) for o, i, _ in shape.quantized)
    biases = sum(o for o, _, has_bias in shape.quantized if has_bias) * a
    # Embeddings and heads are cast to the compute dtype; norms stay fp32 (adapters._prepare_for_kbit_training).
    base = quantized + biases + shape.other_params * a + shape.norm_params * 4
    trainable = sum(r * (i + o) for _, _, i, o in shape.lora)
    adapters = gradients = 4 * trainable
    states = int(OPTIMIZER_STATE_BYTES[optimizer] * trainable)

    tokens = batch_size * seq_len
    per_layer: dict[int, list[tuple[str, int]]] = {k: [] for k in range(shape.n_layers)}
    for index, leaf, width, _ in shape.lora:
        per_layer.setdefault(index, []).append((leaf, width))
    layers = [_layer_bytes_per_token(shape, per_layer[k], r, lora_dropout, a) for k in range(shape.n_layers)]
    # Every layer's input and the last output stay for backward (checkpointed or not), and RoPE's cos/sin.
    kept = tokens * ((shape.n_layers + 1) * shape.hidden + 2 * shape.head_dim) * a
    # bitsandbytes dequantizes one weight at a time for its matmul.
    workspace = max((o * i for o, i, _ in shape.quantized), default=0) * a
    scored = batch_size * positions
    # Forward keeps the log-softmax; its backward holds that, the incoming and the outgoing gradient,
    # all fp32 (16-bit logits are cast up first). The hidden states at scored positions are gathered.
    logits = 3 * scored * shape.vocab * 4 + (scored * shape.vocab * a if a != 4 else 0)
    at_loss = kept + workspace + scored * shape.hidden * a + (0 if gradient_checkpointing else tokens * sum(layers))
    peak_at, activations = "loss backward", at_loss
    if gradient_checkpointing:
        # Backward recomputes one layer at a time; the gradients flowing through it are transient.
        recompute = kept + workspace + tokens * (max(layers) + (2 * shape.intermediate + 2 * shape.hidden) * a)
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
        "activations": f"batch {batch_size} x seq {seq_len}, {str(dtype).removeprefix('torch.')}, checkpointing "
        + ("on" if gradient_checkpointing else "off"),
        "logits": f"3 fp32 copies{'' if a == 4 else ' (+1 16-bit)'} of {scored:,} positions x {shape.vocab:,} vocab"
        if logits
        else "freed by then",
    }
    overhead = FRAMEWORK_OVERHEAD if overhead_bytes is None else overhead_bytes
    return MemoryEstimate(
        overhead=overhead,
        base_weights=base,
        adapters=adapters,
        gradients=gradients,
        optimizer=states,
        activations=int(activations),
        logits=int(logits),
        setup_peak=overhead + 4 * shape.total_params,
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
    shape = _describe(load_config(config), kw.pop("target", ALL_LINEAR))
    need = None
    for micro in sorted((d for d in range(1, effective_batch + 1) if effective_batch % d == 0), reverse=True):
        need = estimate_memory(shape, batch_size=micro, seq_len=seq_len, **kw).total
        if need <= budget_bytes:
            return micro, effective_batch // micro
    raise ValueError(
        f"budget {budget_bytes / GiB:.1f} GiB cannot be met: batch 1 needs {need / GiB:.1f} GiB;"
        " raise the budget or lower seq_len."
    )
