"""LightningModules for the model families lightning-qlora fine-tunes."""

from lightning_qlora.modules.causal_lm import CausalLMModule

__all__ = ["CausalLMModule"]
