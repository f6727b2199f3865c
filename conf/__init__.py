"""Hydra's configs. A package so that Hydra finds them in an installed wheel as ``pkg://lightning_qlora.conf``."""
