"""Adapters out: PEFT-format export with our metadata (merging is ``lightning_qlora.io.merge``).

The exported directory is standard PEFT (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads without this
package. Next to it, ``lightning_qlora.json`` records how the base was quantized during
training, so that a merge or an evaluation rebuilds exactly the base the adapter saw.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.core.adapters import check_adapter_dir
from lightning_qlora.core.quantize import QuantConfig
from lightning_qlora.io.atomic import write_text

log = logging.getLogger(__name__)
METADATA_FILE = "lightning_qlora.json"
MERGED_KEY = "lightning_qlora_merged"
_HEAD_TASKS = {"ForSequenceClassification": "sequence-classification", "ForTokenClassification": "token-classification"}


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
        "task": model_task(base),
        "num_labels": getattr(base.config, "num_labels", None),
        "label_names": _label_names(base),
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


def model_task(model: nn.Module) -> str:
    """``load_model``'s task name for a transformers model: by its class, as ``AutoModelFor<Task>`` names it."""
    name = type(model).__name__
    return next((task for suffix, task in _HEAD_TASKS.items() if name.endswith(suffix)), "causal-lm")


def _label_names(model: nn.Module) -> list[str] | None:
    """A head's class or tag names in id order, from the model config (None for a language-model head)."""
    id2label = getattr(model.config, "id2label", None)
    if model_task(model) == "causal-lm" or not id2label:
        return None
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


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
    # In place in an adapter that already exists: a full disk must not leave it half written.
    write_text(path, json.dumps(meta, indent=2, default=str), "adapter metadata")


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
