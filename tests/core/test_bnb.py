import sys

import pytest

from lightning_qlora.core.bnb import require_bitsandbytes


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'bitsandbytes>=0.46.0,<0.51.0'"):
        require_bitsandbytes()


def test_too_old_bitsandbytes_is_refused(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.5")
    with pytest.raises(ImportError, match=r"bitsandbytes 0.45.5 is too old.*pip install"):
        require_bitsandbytes()


def test_installed_version_is_in_the_tested_range():
    import bitsandbytes
    from packaging.version import Version

    assert Version("0.46") <= Version(bitsandbytes.__version__) < Version("0.51")
    assert require_bitsandbytes() is bitsandbytes
