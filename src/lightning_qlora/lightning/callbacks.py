"""``LoRAAdapters``: the callback that chooses the adapters and exports them."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Generator, Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_qlora.core.adapters import ALL_LINEAR, AdapterConfig, check_adapter_dir
from lightning_qlora.io.atomic import disk_full_error
from lightning_qlora.io.export import save_adapter
from lightning_qlora.lightning.checkpoint import _umask
from lightning_qlora.lightning.plugin import QLoRAPlugin

# What an export writes in a directory: PEFT's files and model card, our metadata.
EXPORT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", "lightning_qlora.json"})


class LoRAAdapters(Callback):
    """Choose the LoRA adapters that :class:`~lightning_qlora.QLoRAPlugin` injects, and export them.

    A callback has no hook between ``configure_model`` and the optimizer, so this one
    hands its spec to the plugin in ``setup`` and the plugin applies it right after
    quantizing. That runs before the optimizer is built whatever the order of plugins
    and callbacks.

    Args:
        r: LoRA rank.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: ``"all-linear"``, a list of module names, or a regex on full names.
        modules_to_save: Modules to train fully and save with the adapter (e.g. ``["score"]``).
        gradient_checkpointing: Recompute activations in backward to save memory; ``k``: every
            k-th decoder layer only (see ``AdapterConfig``).
        export_dir: If set, the adapter is written there in PEFT format at the end of training
            (``on_train_end``), replacing the directory whole (see :func:`replacing_dir`).
        use_dora: DoRA: a learned per-output magnitude on top of the LoRA direction.
        use_rslora: Rank-stabilized scaling ``alpha / sqrt(r)``.
        init: ``"default"`` (B = 0) or ``"loftq"`` (start at the SVD of the quantization error).
        offload_activations: Hold checkpointed layers' inputs in host memory (accelerators only).
        load_from: A saved PEFT adapter directory to start from (to evaluate it, or train on);
            its own config then replaces ``r``, ``alpha``, ``dropout`` and the targets.
    """

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        target_modules: str | Sequence[str] = ALL_LINEAR,
        modules_to_save: Sequence[str] = (),
        gradient_checkpointing: bool | int = True,
        export_dir: str | os.PathLike | None = None,
        load_from: str | os.PathLike | None = None,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: str = "default",
        offload_activations: bool = False,
    ) -> None:
        self.config = AdapterConfig(
            r,
            alpha,
            dropout,
            target_modules,
            tuple(modules_to_save),
            gradient_checkpointing,
            use_dora,
            use_rslora,
            init,
            offload_activations,
        )
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.load_from = str(check_adapter_dir(load_from)) if load_from is not None else None

    @classmethod
    def from_config(cls, config: AdapterConfig, **kwargs) -> LoRAAdapters:
        """A callback for an existing :class:`AdapterConfig`; ``kwargs`` as in ``__init__`` (``export_dir``...)."""
        callback = cls(**kwargs)
        callback.config = config
        return callback

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        plugin = trainer.precision_plugin
        if not isinstance(plugin, QLoRAPlugin):
            raise ValueError(
                f"LoRAAdapters needs QLoRAPlugin, but the Trainer's precision plugin is {type(plugin).__name__};"
                " pass Trainer(plugins=[QLoRAPlugin()], callbacks=[LoRAAdapters(...)])."
            )
        plugin.adapter_config = self.config
        plugin.adapter_source = self.load_from
        # Checkpoints hold only what trains; Lightning's strict load would run before the
        # adapters exist, so QLoRAPlugin loads and checks them itself after injecting them.
        pl_module.strict_loading = False

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before teardown, while the strategy holds the weights as trained (FSDP gathers them from
        # its shards), and before BestAdapter puts the best ones back (in on_fit_end).
        if self.export_dir is not None:
            self.export(trainer, self.export_dir)

    def export(self, trainer: L.Trainer, directory: str | os.PathLike) -> list[Path]:
        """Write the adapter(s) in PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

        Only global rank zero writes, into a new folder that then replaces ``directory`` whole
        (:func:`replacing_dir`). With several transformers models in the module, each goes to a
        sub-directory named after its attribute path.

        Returns:
            The directories written (empty on other ranks).
        """
        return export_adapters(trainer, directory)


def export_adapters(trainer: L.Trainer, directory: str | os.PathLike) -> list[Path]:
    """:meth:`LoRAAdapters.export`, for any Trainer whose precision plugin is a :class:`QLoRAPlugin`."""
    plugin = trainer.precision_plugin
    if not isinstance(plugin, QLoRAPlugin) or not plugin.peft_models:
        raise RuntimeError("No adapters to export: run trainer.fit with QLoRAPlugin first.")
    # Sharded (FSDP) adapters are gathered to rank zero first, which every rank takes part in.
    gather = getattr(plugin, "gather_trainable", None)
    gathered = gather() if callable(gather) else {}
    if not trainer.is_global_zero:
        return []
    directory = Path(directory)
    written = []
    with replacing_dir(directory) as tmp:
        for label, peft_model in plugin.peft_models.items():
            sub = "" if len(plugin.peft_models) == 1 else label
            state = gathered.get(label)
            save_adapter(peft_model, tmp / sub, plugin.quant_config, plugin.promoted(label), state_dict=state)
            written.append(directory / sub)
    for label, target in zip(plugin.peft_models, written, strict=True):
        rank_zero_info(f"LoRAAdapters: exported {label} adapter (PEFT format) to {target}")
    return written


@contextlib.contextmanager
def replacing_dir(directory: Path) -> Generator[Path, None, None]:
    """A new folder beside ``directory`` to write into; on success it replaces ``directory`` whole.

    A kill while writing leaves ``directory`` as it was, never half an adapter: the new folder is
    renamed into place once complete (the previous one is renamed aside first, then deleted).
    """
    if directory.is_dir() and (other := _foreign_entry(directory)) is not None:
        # Replacing the folder deletes what else it holds: refuse rather than lose a user's files.
        raise ValueError(
            f"export directory {directory} holds {other.name!r}, which no adapter export writes; export"
            " to an empty or adapter-only directory (e.g. a new sub-folder)."
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
        yield tmp
        aside = tmp.with_suffix(".old")
        if directory.exists():
            os.replace(directory, aside)
        os.replace(tmp, directory)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports a full disk as its own error type: say it in one line, naming the folder.
        if (full := disk_full_error(err, directory, "adapter")) is not None:
            raise full from err
        raise


def _foreign_entry(directory: Path) -> Path | None:
    """An entry of ``directory`` that no export writes (files of an export, or sub-folders of them), if any."""
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            found = next((e for e in entry.iterdir() if e.name not in EXPORT_FILES), None)
            if found is not None:
                return found
        elif entry.name not in EXPORT_FILES:
            return entry
    return None
