"""What the precision budget buys: validation loss of the untrained quantized model, with and without it.

    python bench/budget.py            # medical recipe sample, embedded default model, CPU

Loads SmolLM2-135M-Instruct three ways (fp32, NF4, NF4 + keep_high_precision=0.05), adds
the default adapters (which start as a no-op), and runs the medical recipe's validation.
The gap to fp32 is what quantization costs; the budget should close part of it.
Writes bench/results/budget.json.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from lightning_qlora.app.build import build_data, build_module
    from lightning_qlora.app.splits import load_splits
    from lightning_qlora.io.models import load_tokenizer
    from lightning_qlora.lightning.plugin import QLoRAPlugin
    from lightning_qlora.tasks.data import get_task

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=medical"])
    task = get_task(cfg.data.task)
    splits, _ = load_splits(cfg.data, task, cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    rows = []
    for name, kwargs in (("nf4", {}), ("nf4 + keep_high_precision=0.05", {"keep_high_precision": 0.05})):
        L.seed_everything(0, verbose=False)
        plugin = QLoRAPlugin(**kwargs)
        trainer = L.Trainer(accelerator="cpu", plugins=[plugin], logger=False, enable_progress_bar=False)
        metrics = trainer.validate(build_module(cfg, task), build_data(cfg, task, tokenizer, splits), verbose=False)[0]
        plan = plugin.budget_plans.get("model")
        rows.append(
            {
                "config": name,
                "val_loss": round(float(metrics["val_loss"]), 4),
                "val_choice_acc": round(float(metrics["val_choice_acc"]), 4),
                "int8_layers": len(plan.promoted) if plan else 0,
                "extra_mib": round(plan.extra_bytes / 2**20, 2) if plan else 0.0,
                "quant_error_mean": round(
                    sum(e.weight_rel_error for e in plugin.quant_errors["model"]) / len(plugin.quant_errors["model"]), 4
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "command": "python bench/budget.py",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, CPU only",
        "rows": rows,
    }
    (ROOT / "bench" / "results" / "budget.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
