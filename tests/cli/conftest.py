"""A tiny random Llama saved with the default tokenizer, shared by the command-line tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from lightning_qlora import load_tokenizer
    from tests.conftest import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer), max_position_embeddings=512, initializer_range=0.02, pad_token_id=2
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cli_command() -> list[str]:
    """The installed ``lightning-qlora`` console script beside this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "lightning-qlora"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_qlora"]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a command under test: warnings quiet, no checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def run_cli(args: list[str], cwd, timeout: int) -> subprocess.CompletedProcess:
    """``lightning-qlora ARGS`` in ``cwd``, as a user runs it (PYTHONPATH unset), output captured."""
    return subprocess.run(
        [*cli_command(), *args], cwd=cwd, capture_output=True, text=True, env=cli_env(), timeout=timeout
    )
