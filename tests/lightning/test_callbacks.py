"""LoRAAdapters' export replaces an adapter directory whole, or leaves it as it was."""

from __future__ import annotations

import pytest

from lightning_qlora.lightning.callbacks import replacing_dir
from lightning_qlora.lightning.checkpoint import _umask


def _adapter(directory, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "lightning_qlora.json"):
        (directory / name).write_text(f"{text} {name}")


def test_a_kill_while_writing_leaves_the_previous_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    _adapter(adapter, "old")
    with pytest.raises(KeyboardInterrupt), replacing_dir(adapter) as tmp:
        (tmp / "adapter_config.json").write_text("new adapter_config.json")
        raise KeyboardInterrupt  # killed before the weights were written
    assert {p.name: p.read_text() for p in adapter.iterdir()} == {
        name: f"old {name}" for name in ("adapter_config.json", "adapter_model.safetensors", "lightning_qlora.json")
    }
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind


def test_a_complete_write_replaces_the_whole_directory(tmp_path):
    adapter = tmp_path / "adapter"
    _adapter(adapter / "model", "old")  # several models: one sub-folder each
    with replacing_dir(adapter) as tmp:
        _adapter(tmp, "new")
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lightning_qlora.json",
    ]
    assert (adapter / "adapter_config.json").read_text() == "new adapter_config.json"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert adapter.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700


def test_a_directory_holding_other_files_is_not_replaced(tmp_path):
    _adapter(tmp_path, "old")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds 'notes.txt', which no adapter export writes"), replacing_dir(tmp_path):
        pass
    assert (tmp_path / "notes.txt").read_text() == "mine"
