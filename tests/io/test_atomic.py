"""Whole-or-nothing text writes: a full disk names the file, keeps the previous one and leaves no temp."""

import os

import pytest

from lightning_qlora.io.atomic import DiskFullError, remove_stale_temps, write_text
from tests.conftest import file_size_limit


def test_a_write_replaces_the_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_text(path, '{"f1": 0.5}', "metrics")
    assert path.read_text() == '{"f1": 0.5}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("the previous report\n")
    with file_size_limit(4096), pytest.raises(DiskFullError) as full:
        write_text(path, "x" * 64 * 1024, "report")
    message = str(full.value)
    assert message.startswith(f"could not write report {path}: disk full or file too large (File too large);")
    assert "\n" not in message and "Free space on that disk" in message
    assert path.read_text() == "the previous report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text(tmp_path / "missing" / "metrics.json", "{}", "metrics")


def test_a_killed_write_leaves_a_temp_that_the_next_start_removes(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    stale = tmp_path / ".metrics.json.k2j4x9ab.tmp"
    stale.write_text('{"half": ')
    assert remove_stale_temps(tmp_path) == [stale]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
