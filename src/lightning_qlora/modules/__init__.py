"""LightningModules for the model families lightning-qlora fine-tunes."""

from lightning_qlora.modules.causal_lm import CausalLMModule
from lightning_qlora.modules.classification import SequenceClassificationModule

__all__ = ["CausalLMModule", "SequenceClassificationModule"]
