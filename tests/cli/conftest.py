"""A tiny random Llama saved with the default tokenizer, shared by the command-line tests.

None of it loads the default model's weights: tests that do are marked slow.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def default_tokenizer():
    """The default model's tokenizer, read from the GGUF that ships it: the weights are never loaded
    or converted (``load_tokenizer()`` would convert the whole model into the cache first, and tests
    not marked slow must not; tests/conftest.py refuses it)."""
    from transformers import AutoTokenizer

    from lightning_qlora.io.models import _GGUF_FILE, _gguf_dir

    tokenizer = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE)
    if tokenizer.pad_token is None:  # as load_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = default_tokenizer()
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
