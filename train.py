"""Fine-tune with QLoRA from a checkout: the same entry as ``lightning-qlora train``.

    python train.py                                   # medical recipe, embedded SmolLM2, CPU
    python train.py recipe=medical trainer.max_steps=200 adapter.r=64
    python train.py -m adapter.r=8,16                 # a sweep

Bad input exits non-zero with one line naming the problem; LIGHTNING_QLORA_DEBUG=1 shows the traceback.
"""

from lightning_qlora.cli.train import main

if __name__ == "__main__":
    main()
