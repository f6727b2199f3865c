"""Lazy, version-checked access to bitsandbytes.

bitsandbytes is imported only when quantization is actually used, so that the
rest of the package (configs, estimators, CLI help) imports without it.
"""

from __future__ import annotations

import logging
from types import ModuleType

from packaging.version import Version

# The 4-bit path runs on CPU from 0.46 on; releases change internals (QuantState,
# int8 APIs), so the upper bound is the newest release our tests ran against.
MIN_VERSION = Version("0.46.0")
MAX_VERSION_EXCLUSIVE = Version("0.51.0")
INSTALL_HINT = f"pip install 'bitsandbytes>={MIN_VERSION},<{MAX_VERSION_EXCLUSIVE}'"


def require_bitsandbytes() -> ModuleType:
    """Import bitsandbytes, checking that its version is in the tested range.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        ModuleNotFoundError: bitsandbytes is not installed.
        ImportError: the installed version is older than 0.46 (no CPU 4-bit path).
    """
    try:
        # bnb warns at import when the optional `kernels` hub package is absent;
        # its native CPU path works without it, so mute only that one logger.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError as err:
        raise ModuleNotFoundError(
            f"QLoRA needs bitsandbytes, which is not installed ({err}). Fix: {INSTALL_HINT}"
        ) from err
    version = Version(getattr(bnb, "__version__", "0"))
    if version < MIN_VERSION:
        raise ImportError(
            f"bitsandbytes {version} is too old: 4-bit quantization on CPU needs {MIN_VERSION} or later."
            f" Fix: {INSTALL_HINT}"
        )
    if version >= MAX_VERSION_EXCLUSIVE:
        logging.getLogger(__name__).warning(
            "bitsandbytes %s is newer than the tested range (<%s); if quantization fails, %s",
            version,
            MAX_VERSION_EXCLUSIVE,
            INSTALL_HINT,
        )
    return bnb


def quantized_linear_types() -> tuple[type, ...]:
    """The bitsandbytes layer classes that count as already quantized."""
    bnb = require_bitsandbytes()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
