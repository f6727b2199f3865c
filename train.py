"""Fine-tune with QLoRA from the command line.

    python train.py                                   # medical recipe, embedded SmolLM2, CPU
    python train.py recipe=medical trainer.max_steps=200 adapter.r=64
    python train.py -m adapter.r=8,16                 # a sweep

Bad input exits non-zero with one line naming the problem; LIGHTNING_QLORA_DEBUG=1 shows the traceback.
"""

import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

# Lightning on torch 2.13 warns about a torch pytree deprecation on every run; not ours to fix.
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
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


if __name__ == "__main__":
    main()
