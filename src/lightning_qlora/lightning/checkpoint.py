"""Adapter-only checkpoints: what trains goes in, the frozen base never does.

A Lightning checkpoint of a QLoRA run would otherwise hold the whole packed base,
which is both large and unloadable into a fresh, not yet quantized model (PL #19732).
The plugin keeps only trainable tensors in ``checkpoint["state_dict"]`` and records
which base, quantization and adapter config they belong to, so that a resume onto a
different model or adapter fails with a clear message instead of a shape error.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from lightning_qlora.io.atomic import RecordingFile, disk_full_error
from lightning_qlora.io.atomic import umask as _umask  # callbacks.py's export imports it from here
from lightning_qlora.lightning.fingerprint import BodySampler, base_fingerprint, other_body
from lightning_qlora.lightning.rng import ResumableRNG

META_KEY = "lightning_qlora"
FORMAT_VERSION = 1


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``module`` by their ``state_dict`` names, detached on CPU."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def check_meta(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Raise ``ValueError`` when a checkpoint's base, quantization or adapter differs from this run's."""
    if saved.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {saved.get('format')!r}, expected {FORMAT_VERSION}.")
    missing = sorted(set(current["models"]) - set(saved["models"]))
    if missing:
        raise ValueError(f"checkpoint {path} holds no adapter for {missing}; it comes from another module.")
    for label, now in current["models"].items():
        then = saved["models"][label]
        a, b = then["base"], now["base"]
        same_embed = a["embed"] is None or b["embed"] is None or abs(a["embed"] - b["embed"]) <= 1e-3 * abs(b["embed"])
        if a["model_type"] != b["model_type"] or a["config"] != b["config"] or not same_embed:
            raise ValueError(
                f"checkpoint {path} was trained on another base model ({a['model_type']}, config {a['config']})"
                f" than this run's {label or 'model'} ({b['model_type']}, config {b['config']}); resume with the"
                " same model.name_or_path, or start a new run."
            )
        if (weight := other_body(a, b)) is not None:
            raise ValueError(
                f"checkpoint {path} was trained on another base model: this run's {label or 'model'} has the"
                f" same config and embeddings but another {weight} (sampled values differ); resume with the"
                " same model.name_or_path (the same weight files), or start a new run."
            )
        check_configs(then, now, path)


# Keys added to a config after checkpoints were written, with the value an older checkpoint had.
_ADDED_KEYS = {"adapter": {"offload_activations": False}, "quant": {}}


def check_configs(then: dict[str, Any], now: dict[str, Any], path: str) -> None:
    """Raise ``ValueError`` when the saved adapter or quant config differs from this run's."""
    for part in ("adapter", "quant"):
        saved = {**_ADDED_KEYS[part], **then[part]}
        # Keys this run cannot know yet (the precision budget's layers, before the model loads) are skipped.
        diff = {k: (saved.get(k), v) for k, v in now[part].items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"checkpoint {path} was saved with another {part} config; differences (saved, now): {diff}."
                f" Use the {part} settings it was trained with, or start a new run."
            )


def plain_config(config: Any) -> dict[str, Any]:
    """A config dataclass as checkpoints store it (``weights_only`` loads no dtypes or tuples)."""
    out = {}
    for key, value in asdict(config).items():
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def load_trainable_state(
    module: nn.Module, state: dict[str, torch.Tensor], path: str, rename: Callable[[str], str] | None = None
) -> None:
    """Copy ``state`` into the trainable parameters of ``module``, checking every name and shape.

    ``rename`` maps ``module``'s parameter names to the saved ones (e.g. without FSDP's wrapper infix).
    """
    rename = rename or (lambda name: name)
    params = {rename(name): p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model's adapters: {len(missing)} missing"
            f" (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); it comes from another"
            " adapter layout."
        )
    for name, param in params.items():
        value = state[name]
        if value.shape != param.shape:
            raise ValueError(
                f"checkpoint {path}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}."
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a lightning-qlora checkpoint safely (``weights_only=True``), or explain why not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path, or use resume=last.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged zip or pickle
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {path} is truncated or corrupted ({first}); resume from an earlier checkpoint"
            " or start a new run."
        ) from err
    if not isinstance(checkpoint, dict) or META_KEY not in checkpoint:
        raise ValueError(
            f"checkpoint {path} was not written by lightning-qlora (no {META_KEY!r} entry);"
            " resume from a checkpoint of a QLoRAPlugin run."
        )
    return checkpoint


class AdapterCheckpoint:
    """The checkpoint side of a QLoRA precision plugin, whose checkpoint hooks delegate here.

    :meth:`save` keeps only the trainable tensors and records what they belong to; :meth:`load`
    checks that record against this run, then copies the tensors in; :meth:`state_dict` and
    :meth:`load_state_dict` carry the plugin's own state (every rank's RNG, the loss scaler).
    """

    def __init__(self) -> None:
        self.fingerprints: dict[str, dict[str, Any]] = {}
        self.rng = ResumableRNG()
        # Digests of the layers quantized while loading (low_memory), taken before they were packed.
        self.loaded = BodySampler()

    def remember_base(self, label: str, model: nn.Module, trained: Iterable[str] = ()) -> None:
        """Fingerprint ``model`` as the base of ``label``, the first time only (before it is quantized).

        ``trained``: the modules trained whole (``modules_to_save``), which are no part of the base.
        """
        if label not in self.fingerprints:
            fingerprint = base_fingerprint(model, trained)
            fingerprint["body"].update(self.loaded.body)
            self.loaded.body = {}
            self.fingerprints[label] = fingerprint

    def meta(self, labels: Iterable[str], quant: dict[str, Any], adapter: dict[str, Any]) -> dict[str, Any]:
        """The record a checkpoint keeps under :data:`META_KEY`: base, quantization and adapter per model."""
        models = {label: {"base": self.fingerprints[label], "quant": quant, "adapter": adapter} for label in labels}
        return {"format": FORMAT_VERSION, "models": models}

    def save(self, checkpoint: dict[str, Any], module: nn.Module, meta: dict[str, Any], weights: bool = True) -> None:
        """Put ``meta`` in ``checkpoint`` and, with ``weights``, only ``module``'s trainable tensors.

        ``weights=False`` when the strategy already gathered them (FSDP). A checkpoint that has a
        record already is left alone.
        """
        if META_KEY in checkpoint:
            return
        if weights:
            checkpoint["state_dict"] = trainable_state(module)
        checkpoint[META_KEY] = meta

    def check(self, checkpoint: dict[str, Any], meta: dict[str, Any], module: nn.Module) -> str:
        """Raise unless ``checkpoint`` is ours and matches ``meta`` (this run's); its path."""
        trainer = getattr(module, "_trainer", None)
        path = str(getattr(trainer, "ckpt_path", None) or "checkpoint")
        if META_KEY not in checkpoint:
            raise ValueError(
                f"{path} is not an adapter-only lightning-qlora checkpoint (no {META_KEY!r} entry);"
                " resume from a checkpoint written by a QLoRAPlugin run."
            )
        check_meta(checkpoint[META_KEY], meta, path)
        return path

    def load(self, checkpoint: dict[str, Any], module: nn.Module, meta: dict[str, Any]) -> None:
        """:meth:`check` ``checkpoint``, then copy its trainable tensors into ``module``."""
        path = self.check(checkpoint, meta, module)
        load_trainable_state(module, checkpoint["state_dict"], path)

    def state_dict(self, scaler: Any = None) -> dict[str, Any]:
        """Every rank's RNG states and, with fp16 on CUDA, the loss ``scaler``'s state; all ranks call it."""
        state = self.rng.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], scaler: Any = None) -> None:
        """Load the ``scaler``'s state now; this rank's RNG states wait for ``self.rng.restore()``."""
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        self.rng.load_state_dict(state)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, then rename it.

    A kill during the write leaves the previous file of that name intact, so ``last.ckpt``
    is always a complete checkpoint (the temporary ``.last.ckpt.XXXXXXXX.tmp`` stays behind:
    :func:`~lightning_qlora.io.atomic.remove_stale_temps`). A full disk raises a one-line
    :class:`~lightning_qlora.io.atomic.DiskFullError` naming the path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        f = None
        try:
            with os.fdopen(fd, "wb") as raw:
                f = RecordingFile(raw)
                torch.save(checkpoint, f)
                raw.flush()
                os.fsync(raw.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            # torch reports a failed write as "RuntimeError: [enforce fail at inline_container.cc] unexpected
            # pos"; the OSError behind it is the one the file saw, or the flush/fsync/close's own.
            full = disk_full_error(f.error if f is not None and f.error is not None else err, path, "checkpoint")
            if full is not None:
                raise full from err
            raise
