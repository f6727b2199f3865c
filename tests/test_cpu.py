"""The CPU allocator default that keeps freed activations out of RSS."""

import platform

import pytest

from lightning_qlora import cpu
from lightning_qlora.plugin import QLoRAPlugin


def test_plugin_pins_glibc_mmap_threshold_on_cpu(tiny_llama):
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only: other C libraries have no such threshold to pin")
    QLoRAPlugin().convert_module(tiny_llama)
    assert cpu._applied == 64 * 1024
    assert cpu.pin_mmap_threshold(64 * 1024)  # idempotent


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold=0 should be a positive number of bytes"):
        cpu.pin_mmap_threshold(0)
