"""``python -m lightning_qlora``: the same as ``lightning-qlora`` (train, merge, generate, evaluate, estimate)."""

import sys

from lightning_qlora.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
