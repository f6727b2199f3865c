"""Adapters out: PEFT-format export with our metadata, and merging into a plain 16-bit model.

The exported directory is standard PEFT (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads without this
package. Next to it, ``lightning_qlora.json`` records how the base was quantized during
training, so that a merge or an evaluation rebuilds exactly the base the adapter saw.
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

from lightning_qlora.quantize import QuantConfig, dequantized_weight

log = logging.getLogger(__name__)
METADATA_FILE = "lightning_qlora.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_KEY = "lightning_qlora_merged"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_adapter_dir(directory: str | os.PathLike) -> Path:
    """Raise ``FileNotFoundError`` naming what an adapter directory lacks."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist; pass the run's adapter/ folder.")
    missing = [f for f in ADAPTER_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"adapter directory {directory} lacks {', '.join(missing)}; export it again (LoRAAdapters(export_dir=...))"
            " or point at a complete PEFT adapter."
        )
    return directory


def save_adapter(
    peft_model: nn.Module,
    directory: str | os.PathLike,
    quant: QuantConfig,
    int8_modules: tuple[str, ...] = (),
    state_dict: dict[str, torch.Tensor] | None = None,
    **extra: Any,
) -> Path:
    """Write ``peft_model``'s adapter in PEFT format plus ``lightning_qlora.json``.

    ``state_dict``: the adapter's tensors by their file keys, when the model's parameters are
    not whole (FSDP shards them; ``QLoRAFSDPPlugin.gather_trainable`` gives this).
    """
    directory = Path(directory)
    if state_dict is None:
        peft_model.save_pretrained(str(directory), safe_serialization=True)
    else:
        _save_gathered(peft_model, directory, state_dict)
    base = peft_model.get_base_model()
    meta = {
        "format": 1,
        "base_model": getattr(base.config, "name_or_path", None),
        "task": "sequence-classification" if type(base).__name__.endswith("ForSequenceClassification") else "causal-lm",
        "num_labels": getattr(base.config, "num_labels", None),
        "quant": {
            "quant_type": quant.quant_type,
            "double_quant": quant.double_quant,
            "quant_storage": str(quant.quant_storage).removeprefix("torch."),
            "skip_modules": list(quant.skip_modules),
            "int8_modules": list(int8_modules),  # kept in int8 by a precision budget
        },
        **extra,
    }
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return directory


def _save_gathered(peft_model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """PEFT's adapter files from tensors already keyed as PEFT saves them."""
    import copy

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    save_file(contiguous, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(directory))


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Our metadata for an adapter directory; an empty dict for a plain PEFT adapter."""
    path = check_adapter_dir(directory) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); export the adapter again.") from err


def update_metadata(directory: str | os.PathLike, **fields: Any) -> None:
    """Add fields (the training config, final metrics) to an adapter's metadata."""
    path = Path(directory) / METADATA_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.update(fields)
    path.write_text(json.dumps(meta, indent=2, default=str))


def quant_config_of(meta: dict[str, Any]) -> QuantConfig:
    """The QuantConfig an adapter was trained on (NF4 + double quantization if unrecorded)."""
    q = dict(meta.get("quant") or {})
    return QuantConfig(
        q.get("quant_type", "nf4"),
        q.get("double_quant", True),
        "fp32",
        q.get("quant_storage", "uint8"),
        tuple(q.get("skip_modules", ())),
    )


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
    from lightning_qlora.models import load_model
    from lightning_qlora.quantize import quantize_model

    task = meta.get("task", "causal-lm")
    kwargs = {"num_labels": meta["num_labels"]} if task == "sequence-classification" and meta.get("num_labels") else {}
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

    from lightning_qlora.models import load_tokenizer

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
        "- Load with `AutoModelForCausalLM.from_pretrained(this_dir)` (no peft or bitsandbytes needed).",
    ]
    if meta.get("metrics"):
        lines += ["", "## Metrics", "", "```json", json.dumps(meta["metrics"], indent=2), "```"]
    if meta.get("training_config"):
        lines += ["", "## Training config", "", "```yaml", str(meta["training_config"]).rstrip(), "```"]
    return "\n".join(lines) + "\n"
