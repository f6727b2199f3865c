"""What a checkpoint records of its base model, to refuse a resume onto another one.

A checkpoint holds only the adapters, so a resume onto another base would load without a shape
error and train on nonsense. The fingerprint is the config (architecture and size), the input
embeddings' checksum, and a digest of a few sampled values of every other weight (the body):
cheap at setup, yet another model of the same shape differs in it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# Config keys that do not change the weights' meaning (paths, dtypes, runtime flags).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "quantization_config",
    "_attn_implementation_autoset",
    "architectures",
}


def base_fingerprint(model: nn.Module, trained: Iterable[str] = ()) -> dict[str, Any]:
    """Identify a base model by its architecture, its input embeddings and its body's weights.

    The config hash catches another architecture or size; the embedding checksum and the body's
    sampled weights (:func:`weight_digest` of every float parameter) catch another model of the
    same shape: base versus instruct, or another body behind the same embeddings. Call it before
    quantizing: the packed layers of an already quantized model are left out (see :class:`BodySampler`).
    ``trained``: modules trained whole (``modules_to_save``), left out too: a new head starts from a
    random init, and the checkpoint holds its trained weights anyway.
    """
    config = getattr(model, "config", None)
    arch = {}
    if config is not None:
        arch = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    checksum = None
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        # Row blocks summed in fp64: a whole-table .double().abs() would briefly take 4x the
        # embedding's size, the peak of an otherwise lean setup.
        weight = emb.weight.detach()
        checksum = float(sum(block.abs().sum(dtype=torch.float64) for block in weight.split(4096)))
    trained = tuple(trained)
    body = {
        name: weight_digest(param)
        for name, param in model.named_parameters()
        # bitsandbytes' packed parameters are subclasses; a meta tensor (FSDP's other ranks) has no values.
        if type(param) is nn.Parameter
        and param.is_floating_point()
        and not param.is_meta
        and not _within(name, trained)
    }
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "config": digest,
        "embed": checksum,
        "body": body,
    }


def _within(param: str, modules: tuple[str, ...]) -> bool:
    """Whether parameter ``param`` belongs to one of ``modules``, matched on the end of its module path as PEFT does."""
    path = "." + param.rpartition(".")[0]
    return any(path.endswith("." + module) for module in modules)


# Elements sampled per weight: enough that another model's weights differ in some of them.
_SAMPLES = 16


def weight_digest(weight: torch.Tensor) -> str:
    """A short digest of ``_SAMPLES`` elements of ``weight`` at fixed positions, rounded to bf16.

    The positions depend on the size only, so the digest is the same whatever the device; the bf16
    rounding makes it the same whether the base was loaded in fp32 or in its bf16 checkpoint dtype.
    """
    flat = weight.detach().reshape(-1)
    if flat.numel() == 0:
        return "empty"
    # A generator of its own: the global RNG stream (LoRA dropout's) must not move.
    where = torch.randint(0, flat.numel(), (_SAMPLES,), generator=torch.Generator().manual_seed(flat.numel()))
    values = flat[where.to(flat.device)].to("cpu", torch.bfloat16).view(torch.int16)
    return hashlib.sha256(values.numpy().tobytes()).hexdigest()[:12]


class BodySampler:
    """An ``on_layer`` hook for quantizing while loading: digests each layer's weight before it is packed.

    :func:`base_fingerprint` then sees only packed bytes for those layers; the plugin's checkpoint helper
    (:meth:`~lightning_qlora.lightning.checkpoint.AdapterCheckpoint.remember_base`) adds these digests,
    so that a low-memory load and a plain one fingerprint the same base alike.
    """

    def __init__(self) -> None:
        self.body: dict[str, str] = {}

    def __call__(self, name: str, weight: torch.Tensor, layer: nn.Module) -> None:
        self.body[f"{name}.weight"] = weight_digest(weight)


def other_body(then: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first weight whose digest differs between two fingerprints (older checkpoints have none)."""
    a, b = then.get("body") or {}, now.get("body") or {}
    return next((name for name in sorted(a.keys() & b.keys()) if a[name] != b[name]), None)
