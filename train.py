"""Fine-tune with QLoRA from the command line.

    python train.py                                   # medical recipe, embedded SmolLM2, CPU
    python train.py recipe=medical trainer.max_steps=200 adapter.r=64
    python train.py -m adapter.r=8,16                 # a sweep

Bad input exits non-zero with one line naming the problem; LIGHTNING_QLORA_DEBUG=1 shows the traceback.
"""

import os
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lightning_qlora.cli.train import run

    try:
        run(cfg)
    except (ValueError, TypeError, OSError, ImportError) as err:
        if os.environ.get("LIGHTNING_QLORA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
