"""The top-level package: its public names, loaded on first use."""

import subprocess
import sys

import lightning_qlora


def test_every_public_name_imports():
    for name in lightning_qlora.__all__:
        assert getattr(lightning_qlora, name) is not None, name
    assert set(lightning_qlora.__all__) == set(lightning_qlora._EXPORTS)


def test_importing_the_package_does_not_import_torch():
    # `lightning-qlora --help` and config checks should not wait for torch, Lightning and transformers.
    code = (
        "import sys, lightning_qlora, lightning_qlora.cli.main;"
        " print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
