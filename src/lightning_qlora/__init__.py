"""lightning-qlora: QLoRA fine-tuning with PyTorch Lightning.

trainer = L.Trainer(plugins=[QLoRAPlugin()], callbacks=[LoRAAdapters(r=16)])

The public names load on first use, so that ``lightning-qlora --help`` and config checks do not
wait for torch, Lightning and transformers to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AdapterConfig": "lightning_qlora.core.adapters",
    "add_adapters": "lightning_qlora.core.adapters",
    "QuantConfig": "lightning_qlora.core.quantize",
    "quantize_model": "lightning_qlora.core.quantize",
    "CPUOptions": "lightning_qlora.cpu",
    "DEFAULT_MODEL": "lightning_qlora.io.models",
    "load_model": "lightning_qlora.io.models",
    "load_tokenizer": "lightning_qlora.io.models",
    "LoRAAdapters": "lightning_qlora.lightning.callbacks",
    "QLoRAFSDPPlugin": "lightning_qlora.lightning.fsdp",
    "QLoRAFSDPStrategy": "lightning_qlora.lightning.fsdp",
    "QLoRAPlugin": "lightning_qlora.lightning.plugin",
    "prepare": "lightning_qlora.prepare",
    "CausalLMModule": "lightning_qlora.tasks",
}
__all__ = [
    "AdapterConfig",
    "CPUOptions",
    "CausalLMModule",
    "DEFAULT_MODEL",
    "LoRAAdapters",
    "QLoRAFSDPPlugin",
    "QLoRAFSDPStrategy",
    "QLoRAPlugin",
    "QuantConfig",
    "add_adapters",
    "load_model",
    "load_tokenizer",
    "prepare",
    "quantize_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lightning_qlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from lightning_qlora.core.adapters import AdapterConfig, add_adapters
    from lightning_qlora.core.quantize import QuantConfig, quantize_model
    from lightning_qlora.cpu import CPUOptions
    from lightning_qlora.io.models import DEFAULT_MODEL, load_model, load_tokenizer
    from lightning_qlora.lightning.callbacks import LoRAAdapters
    from lightning_qlora.lightning.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy
    from lightning_qlora.lightning.plugin import QLoRAPlugin
    from lightning_qlora.prepare import prepare
    from lightning_qlora.tasks import CausalLMModule
