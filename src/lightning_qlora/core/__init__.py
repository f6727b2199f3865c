"""The Lightning-free core: quantize, adapters, LoFTQ, the precision budget, quantization error,
low-memory loading, bitsandbytes access and process memory.

May import: torch, transformers, peft, bitsandbytes; nothing else of this package.
"""
