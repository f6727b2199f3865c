"""What the memory estimator reads off a model config: its layers, widths and parameter counts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_qlora.core.adapters import AdapterConfig, resolve_targets
from lightning_qlora.core.quantize import head_names

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


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
class ModelShape:
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


def describe(config, target: str | tuple[str, ...]) -> ModelShape:
    """Count the layers, widths and parameters the estimate needs, on the meta device (no weights)."""
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
    return ModelShape(
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
