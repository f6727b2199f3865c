"""``lightning-qlora train``: fine-tune with QLoRA, configured by Hydra overrides.

    lightning-qlora train                             # sentiment recipe, embedded SmolLM2, CPU
    lightning-qlora train recipe=medical trainer.max_steps=200 adapter.r=64
    lightning-qlora train -m adapter.r=8,16           # a sweep
    lightning-qlora train --config-dir ./my_conf recipe=mine   # a recipe of your own

The configs ship inside the package (``pkg://lightning_qlora.conf``), so this runs from any
directory. Bad input exits 2 with one line naming the problem; ``LIGHTNING_QLORA_DEBUG=1`` shows
the traceback. Preemption (SIGTERM) exits 143 after saving a checkpoint.
"""

from __future__ import annotations

import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

# Lightning on torch 2.13 warns about a torch pytree deprecation on every run; not ours to fix.
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")

CONFIG_MODULE = "lightning_qlora.conf"


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra's entry: parses ``sys.argv[1:]`` as overrides and runs one job of them."""
    from hydra.core.hydra_config import HydraConfig

    from lightning_qlora.app.train import Preempted, run

    try:
        # In a sweep (-m), each job gets its own subdirectory of output_dir.
        run(cfg, out=HydraConfig.get().runtime.output_dir)
    except Preempted as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as schedulers expect of a terminated job
    except (ValueError, TypeError, OSError, ImportError) as err:
        if os.environ.get("LIGHTNING_QLORA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_cli(args: list[str], prog: str = "lightning-qlora train") -> None:
    """Run :func:`main` on ``args`` (Hydra reads them from ``sys.argv`` only)."""
    sys.argv = [prog, *args]
    main()
