"""Merging an adapter into its dequantized base: a plain 16-bit model with no PEFT or bitsandbytes.

The base is rebuilt exactly as it was quantized in training (``lightning_qlora.json``), each
4-bit layer is dequantized, and the LoRA update is added to the dense weight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.core.adapters import ADAPTER_FILES
from lightning_qlora.core.quantize import dequantized_weight
from lightning_qlora.io.export import MERGED_KEY, quant_config_of, read_metadata

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}


def dequantize_model(model: nn.Module) -> int:
    """Replace every bitsandbytes layer with a plain fp32 ``nn.Linear`` of its dequantized weight."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantized_weight(layer), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.data.float(), requires_grad=False)
        setattr(parent, child, linear)
    return len(names)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_base(base: str, meta: dict[str, Any], *, quantize: bool = True, trust_remote_code: bool = False):
    """The base an adapter was trained on: loaded, then quantized as in training (or left in fp32)."""
    from lightning_qlora.core.quantize import quantize_model
    from lightning_qlora.io.models import load_model

    task = meta.get("task", "causal-lm")
    kwargs = {}
    if task != "causal-lm" and meta.get("num_labels"):
        kwargs["num_labels"] = meta["num_labels"]
    if task != "causal-lm" and meta.get("label_names"):  # the merged model's config names its classes
        kwargs["id2label"] = dict(enumerate(meta["label_names"]))
        kwargs["label2id"] = {name: i for i, name in enumerate(meta["label_names"])}
    model = load_model(base, task=task, trust_remote_code=trust_remote_code, **kwargs)
    merged = getattr(model.config, MERGED_KEY, None)
    if merged:
        raise ValueError(
            f"base {base} already has an adapter merged into it ({merged.get('adapter')}); merging or loading an"
            " adapter again would add its update twice. Use the original base model."
        )
    if quantize:
        int8_modules = (meta.get("quant") or {}).get("int8_modules", [])
        quantize_model(model, quant_config_of(meta), torch.device("cpu"), int8_modules=int8_modules)
    return model


def merge(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    base: str | None = None,
    dtype: str = "bf16",
    force: bool = False,
) -> Path:
    """Merge an adapter into its dequantized base and save a plain transformers model.

    The base is quantized exactly as in training and dequantized again, so the merged
    weights are ``dequant(quant(W)) + scale * B @ A``: the function the adapter was
    trained against, up to rounding to ``dtype``.

    Args:
        adapter: The exported adapter directory.
        output: Where the merged model goes; must not hold a model unless ``force``.
        base: The base model; defaults to the one recorded in the adapter.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` for the saved weights.
        force: Replace an existing model at ``output``.

    Returns:
        The output directory.
    """
    from peft import PeftModel

    from lightning_qlora.io.models import load_tokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of: {', '.join(_DTYPES)}.")
    adapter, output = Path(adapter), Path(output)
    meta = read_metadata(adapter)
    base = (
        base
        or meta.get("base_model")
        or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    )
    if not base:
        raise ValueError(f"adapter {adapter} does not record its base model; pass --base PATH.")
    if output.exists() and any(output.iterdir()) and not force:
        raise FileExistsError(f"output {output} already holds files; choose another --output or pass --force.")
    if output.resolve() == Path(str(base)).resolve():
        raise ValueError(f"output {output} is the base model's own directory; choose another --output.")

    model = load_base(str(base), meta)
    dequantize_model(model)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged = merged.to(_DTYPES[dtype])
    setattr(merged.config, MERGED_KEY, {"adapter": str(adapter), "sha256": _sha256(adapter / ADAPTER_FILES[1])})

    # Write next to the target and swap in at the end: a failure never leaves half a model.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        try:
            load_tokenizer(str(base)).save_pretrained(staging)
        except OSError:
            log.warning("No tokenizer found with base %s; the merged model at %s has none, copy one in.", base, output)
        (staging / "README.md").write_text(model_card(meta, adapter, str(base), dtype))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def model_card(meta: dict[str, Any], adapter: Path, base: str, dtype: str) -> str:
    """A short model card: what was merged, how it was trained, and what it scored."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [lightning-qlora, qlora, lora, merged]",
        "---",
        "",
        "# Merged QLoRA fine-tune",
        "",
        f"- Base: `{base}`, quantized during training as `{json.dumps(meta.get('quant', {}))}`.",
        f"- Adapter: `{adapter}`, merged into the dequantized base and saved in {dtype}.",
        f"- Load with `{_AUTO_CLASSES.get(meta.get('task'), 'AutoModelForCausalLM')}.from_pretrained(this_dir)`"
        " (no peft or bitsandbytes needed).",
    ]
    if meta.get("metrics"):
        lines += ["", "## Metrics", "", "```json", json.dumps(meta["metrics"], indent=2), "```"]
    if meta.get("training_config"):
        lines += ["", "## Training config", "", "```yaml", str(meta["training_config"]).rstrip(), "```"]
    return "\n".join(lines) + "\n"
