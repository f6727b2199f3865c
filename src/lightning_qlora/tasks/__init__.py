"""Tasks: the LightningModules (causal LM, sequence and token classification), their data and metrics.

May import: ``lightning_qlora.core``, ``.io``; Lightning.
"""

from lightning_qlora.tasks.causal_lm import CausalLMModule
from lightning_qlora.tasks.classification import SequenceClassificationModule
from lightning_qlora.tasks.token_classification import TokenClassificationModule

__all__ = ["CausalLMModule", "SequenceClassificationModule", "TokenClassificationModule"]
