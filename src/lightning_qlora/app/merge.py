"""``lightning-qlora merge``: an adapter merged into its dequantized base (``lightning_qlora.io.merge``)."""

from lightning_qlora.io.merge import merge

__all__ = ["merge"]
