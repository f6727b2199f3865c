"""Low-memory loading: quantize while reading the checkpoint, one tensor at a time.

``from_pretrained`` followed by quantization holds the whole fp32 model in host memory
first, so peak RSS is the 16/32-bit model size. Here the model skeleton is built with
parameters on the meta device, and each weight is read from the safetensors shards,
quantized on the target device, and dropped. Peak host memory is the 4-bit model plus the
unquantized parts (embeddings, norms, heads) plus one tensor.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lightning_qlora.core.bnb import require_bitsandbytes
from lightning_qlora.core.memory import release_free_memory
from lightning_qlora.core.quantize import (
    QuantConfig,
    QuantReport,
    _make_quantized,
    head_names,
    quantize_model,
    quantized_nbytes,
    select_linears,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Loading trims the heap after this many bytes of fp32 weights are dropped: the peak while loading
# stays within this of quantized-so-far plus one layer.
RELEASE_EVERY = 32 * 2**20
_TASKS = ("causal-lm", "sequence-classification", "token-classification")


def load_quantized(
    name_or_path: str | os.PathLike,
    config: QuantConfig | None = None,
    task: str = "causal-lm",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    on_layer: Callable[[str, torch.Tensor, nn.Module], None] | None = None,
    **config_kwargs,
) -> tuple[nn.Module, QuantReport]:
    """Load a transformers model with its Linear layers quantized as they are read.

    Gives the same model as ``load_model`` followed by ``quantize_model`` (the same packed
    bytes, since both quantize the fp32 values), without holding the fp32 model in memory.

    Args:
        name_or_path: A local directory with ``*.safetensors`` shards (``lightning_qlora.load_model``
            with ``low_memory=True`` also takes a hub id or the embedded default).
        config: Quantization settings (NF4 with double quantization by default).
        task: ``"causal-lm"``, ``"sequence-classification"`` or ``"token-classification"``.
        device: Where the quantized weights go (CPU by default).
        trust_remote_code: Allow the model's own code (off unless you trust it).
        on_layer: Called as ``on_layer(name, original_weight, quantized_layer)`` for each layer.
        **config_kwargs: Passed to ``AutoConfig`` (e.g. ``num_labels``).

    Returns:
        ``(model, report)``.
    """
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is unknown; use one of: {', '.join(_TASKS)}.")
    config = config or QuantConfig()
    require_bitsandbytes()
    folder = Path(name_or_path).expanduser()
    files = safetensors_files(folder) if folder.is_dir() else []
    if not files:
        raise ValueError(
            f"low-memory loading reads safetensors shards, and {str(name_or_path)!r} has none; save the model with"
            " save_pretrained(..., safe_serialization=True), or load it with model.low_memory=false."
        )
    # Lightning's configure_model runs under `with torch.device(accelerator)`: what is made on
    # the host here (skeleton buffers, unquantized weights) must not follow it there.
    device = torch.device(device or "cpu")
    with torch.device("cpu"):
        return _load(folder, files, config, task, device, trust_remote_code, on_layer, config_kwargs)


def safetensors_files(folder: Path) -> list[Path]:
    """The shards of the checkpoint in ``folder``: those its index names, else ``model.safetensors``, else all."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{index} is not a valid shard index ({err!r}); re-save or re-download the model."
            ) from err
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks {missing[0]}, which its index names ({len(missing)} shard(s) missing);"
                " re-download or re-save the model."
            )
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def _load(
    path: Path,
    files: list[Path],
    config: QuantConfig,
    task: str,
    device: torch.device,
    trust_remote_code: bool,
    on_layer: Callable[[str, torch.Tensor, nn.Module], None] | None,
    config_kwargs: dict,
) -> tuple[nn.Module, QuantReport]:
    from accelerate import init_empty_weights
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    bnb = require_bitsandbytes()
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **config_kwargs)
    cls = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
    }[task]
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary tables etc. stay real
        model = cls.from_config(hf_config, trust_remote_code=trust_remote_code, dtype=torch.float32)

    targets = {name: module for name, module in select_linears(model, config)[0]}
    compute_dtype = config.resolve_compute_dtype(device)
    report = QuantReport(config.quant_type, compute_dtype, device)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unreleased = 0  # bytes of weights dropped since the last trim
    for file in files:
        for key, tensor in iter_safetensors(file):
            module_name, _, leaf = key.rpartition(".")
            if module_name in targets:
                pending.setdefault(module_name, {})[leaf] = tensor
                linear = targets[module_name]
                if {"weight"} | ({"bias"} if linear.bias is not None else set()) <= pending[module_name].keys():
                    parts = pending.pop(module_name)
                    new = _quantize_one(bnb, linear, parts, config, compute_dtype, device)
                    if on_layer is not None:
                        on_layer(module_name, parts["weight"], new)
                    del parts
                    parent, _, child = module_name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, new)
                    report.quantized.append(module_name)
                    fp32_bytes = linear.in_features * linear.out_features * 4
                    report.bytes_before += fp32_bytes
                    report.bytes_after += quantized_nbytes(new)
                    # glibc keeps freed pages otherwise, and they count as RSS. Trimming walks the
                    # whole heap, so once per RELEASE_EVERY bytes rather than after every layer.
                    unreleased += fp32_bytes
                    if unreleased >= RELEASE_EVERY:
                        release_free_memory()
                        unreleased = 0
            else:
                _assign(model, module_name, leaf, tensor)
    release_free_memory()
    _tie_as_from_pretrained(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    heads = head_names(model)
    lost = [n for n in missing if not any(n == h or n.startswith(h + ".") for h in heads)]
    if lost:
        raise ValueError(
            f"{path} has no weights for {len(lost)} parameters (e.g. {lost[0]!r}); its tensor names differ from"
            " this transformers version's, so load it with model.low_memory=false."
        )
    _init_missing(model)  # only new heads (e.g. a classification head) start from their usual init
    # Sets the flags PEFT reads, and fails loudly if a target layer never got its weight.
    quantize_model(model, config, device)
    return model.to(device), report


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a safetensors file, reading one tensor's bytes at a time.

    ``safe_open`` memory-maps the whole file, and every page it touches counts towards the
    process's resident memory until the file is closed; plain reads free each tensor's bytes
    as soon as the tensor is dropped.
    """
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(size))
        except ValueError as err:
            raise ValueError(f"{path} is not a valid safetensors file ({err}); re-save the model.") from err
        header.pop("__metadata__", None)
        start = 8 + size
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
            if math.prod(info["shape"]) * dtype.itemsize != end - begin:
                raise ValueError(
                    f"{path}: tensor {name!r} has {end - begin} bytes for shape {info['shape']}; re-save the model."
                )
            f.seek(start + begin)
            # Read straight into the tensor's own memory: one copy from the page cache, not two.
            data = torch.empty(end - begin, dtype=torch.uint8)
            if data.numel() and f.readinto(memoryview(data.numpy())) != end - begin:
                raise ValueError(f"{path} is truncated at tensor {name!r}; re-save or re-download the model.")
            yield name, data.view(dtype).reshape(info["shape"])


def _quantize_one(
    bnb, shell: nn.Linear, parts: dict[str, torch.Tensor], config: QuantConfig, dtype: torch.dtype, device
) -> nn.Module:
    linear = nn.Linear(shell.in_features, shell.out_features, bias="bias" in parts, device="meta")
    linear.weight = nn.Parameter(parts["weight"].float(), requires_grad=False)
    if "bias" in parts:
        linear.bias = nn.Parameter(parts["bias"].float(), requires_grad=False)
    return _make_quantized(bnb, linear, config, dtype, torch.device(device))


def _assign(model: nn.Module, module_name: str, leaf: str, tensor: torch.Tensor) -> None:
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return  # a tensor this architecture does not use (e.g. a head of another task)
    if tensor.is_floating_point():
        tensor = tensor.float()
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor


def _tie_as_from_pretrained(model: nn.Module) -> None:
    """Tie the weights the config ties, deciding as ``from_pretrained`` does from what the file held.

    transformers 5 leaves a head untied when the file holds it with values of its own, and ties
    to whichever of the pair the file holds; a plain ``tie_weights()`` would overwrite the head with
    the embedding and give another model than ``load_model``.
    """
    if "missing_keys" not in inspect.signature(model.tie_weights).parameters:
        model.tie_weights()  # transformers 4: the file's own head is overwritten there too
        return
    missing = {name for name, param in model.named_parameters(remove_duplicate=False) if param.is_meta}
    model.tie_weights(missing_keys=missing)


def _init_missing(model: nn.Module) -> None:
    """Give parameters the checkpoint lacks (e.g. a new classification head) their usual init."""
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
