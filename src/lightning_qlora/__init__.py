"""lightning-qlora: QLoRA fine-tuning with PyTorch Lightning.

trainer = L.Trainer(plugins=[QLoRAPlugin()], callbacks=[LoRAAdapters(r=16)])
"""

from lightning_qlora.core.adapters import AdapterConfig, add_adapters
from lightning_qlora.core.quantize import QuantConfig, quantize_model
from lightning_qlora.cpu import CPUOptions
from lightning_qlora.io.models import DEFAULT_MODEL, load_model, load_tokenizer
from lightning_qlora.lightning.callbacks import LoRAAdapters
from lightning_qlora.lightning.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy
from lightning_qlora.lightning.plugin import QLoRAPlugin
from lightning_qlora.prepare import prepare
from lightning_qlora.tasks import CausalLMModule

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AdapterConfig",
    "CPUOptions",
    "CausalLMModule",
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
