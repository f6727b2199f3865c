"""Peak host memory of loading a model for QLoRA: load-then-quantize vs quantize-while-loading.

    python bench/lowmem.py                 # the embedded default model, and a ~1.1B random Llama
    python bench/lowmem.py --skip-1b

Each load runs in a fresh process; the figure is the peak RSS (VmHWM) above the RSS right
after imports, so the libraries' own ~430 MiB is left out. Writes bench/results/lowmem.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
from lightning_qlora.lowmem import load_quantized
from lightning_qlora.models import load_model
from lightning_qlora.quantize import quantize_model

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak from here on
start = time.perf_counter()
if sys.argv[2] == "low_memory":
    model, report = load_quantized(sys.argv[1])
else:
    model = load_model(sys.argv[1])
    report = quantize_model(model)
print(json.dumps({"peak_mib": round(status("VmHWM") - base, 1), "seconds": round(time.perf_counter() - start, 1),
                  "quantized_mib": round(report.bytes_after / 2**20, 1), "layers": len(report.quantized)}))
"""


def measure(path: str, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, path, mode], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def random_1b(folder: Path) -> str:
    """A TinyLlama-1.1B-shaped Llama with random weights, saved in bf16 (2.2 GB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="1GB")
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    from lightning_qlora.models import resolve_model_path

    models = {"SmolLM2-135M-Instruct (fp32 safetensors)": resolve_model_path("smollm2-135m-instruct")}
    tmp = tempfile.TemporaryDirectory()
    if not args.skip_1b:
        models["random Llama 1.1B (bf16 safetensors, 3 shards)"] = random_1b(Path(tmp.name))
    rows = []
    for name, path in models.items():
        for mode in ("load_then_quantize", "low_memory"):
            result = measure(path, mode)
            rows.append({"model": name, "mode": mode, **result})
            print(json.dumps(rows[-1]), flush=True)
    out = {
        "command": "python bench/lowmem.py",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "unix_time": int(time.time()),
        "rows": rows,
    }
    Path(__file__).parent.joinpath("results", "lowmem.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
