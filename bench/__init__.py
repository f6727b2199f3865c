"""Benchmarks of lightning-qlora against the usual QLoRA stack (transformers + bitsandbytes + PEFT).

See bench/README.md; the entry point is ``python bench/run.py {cpu,gpu,quality}``.
"""
