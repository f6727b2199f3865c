"""Peak host memory of loading a model for QLoRA: load-then-quantize vs quantize-while-loading.

    python bench/lowmem.py                 # the embedded default model, and a ~1.1B random Llama
    python bench/lowmem.py --skip-1b
    python bench/lowmem.py --hub           # a hub id from the hub cache: ours vs transformers + bnb

Each load runs in a fresh process; the figure is the peak RSS (VmHWM) above the RSS right
after imports, so the libraries' own ~430 MiB is left out. Writes bench/results/lowmem.json,
or with ``--hub`` bench/results/lowmem-hub.json (see ``hub_main``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python bench/lowmem.py`): make `bench` importable from the repo root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = """
import json, sys, time
from lightning_qlora.core.lowmem import load_quantized
from lightning_qlora.io.models import load_model
from lightning_qlora.core.quantize import quantize_model

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
    parser.add_argument("--hub", action="store_true", help="load a random model by hub id: ours vs the peer")
    parser.add_argument("--shape", default="smollm2-1.7b", choices=sorted(HUB_SHAPES), help="with --hub")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lightning_qlora" / "bench" / "hub"))
    parser.add_argument("--runs", type=int, default=1, help="with --hub: loads per side, alternating")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowmem-hub.json"), help="with --hub")
    args = parser.parse_args()
    if args.hub:
        hub_main(args)
        return
    from lightning_qlora.io.models import resolve_model_path

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


# --hub: a hub id read from a hub cache laid out as huggingface_hub lays it out, by both stacks.
HUB_SHAPES = {
    # HuggingFaceTB/SmolLM2-1.7B's config.json (1.71B parameters, tied embeddings).
    "smollm2-1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=130000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024),
}

HUB_CHILD = """
import json, sys, time
import accelerate, bitsandbytes, torch, transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from lightning_qlora.io.models import load_model
from lightning_qlora.core.quantize import QuantConfig
from bench.common import hwm_mib, reset_hwm, rss_mib

repo, side = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
compute = torch.bfloat16 if cuda else torch.float32
base = rss_mib()
reset_hwm()  # peak from here on: imports don't count
start = time.perf_counter()
if side == "ours":
    model = load_model(repo, low_memory=True, quant_config=QuantConfig(), device=device)
else:
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(repo, quantization_config=quant, dtype=compute,
                                                 device_map={"": device})
seconds = time.perf_counter() - start
out = {"peak_rss_mib": round(hwm_mib() - base, 1), "rss_after_mib": round(rss_mib() - base, 1),
       "seconds": round(seconds, 1), "layers_4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules())}
if cuda:
    out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["gpu_after_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
print(json.dumps(out))
"""


def hub_repo(cache: Path, shape_name: str) -> tuple[str, Path]:
    """Write a random bf16 model of ``shape_name`` once, as the hub cache holds a download; returns (id, snapshot)."""
    from bench.random_model import write_random_llama

    repo = f"bench/{shape_name}-random"
    shape = HUB_SHAPES[shape_name]
    store = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()  # a fake, stable revision
    snapshot = store / "snapshots" / commit
    write_random_llama(snapshot, shape, shard_bytes=1 << 30)  # no-op when already written
    (store / "refs").mkdir(exist_ok=True)
    (store / "refs" / "main").write_text(commit)
    return repo, snapshot


def model_parameters(snapshot: Path) -> int:
    """The model's parameters, tied ones counted once (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(snapshot))
    return sum(p.numel() for p in model.parameters())


def measure_hub(repo: str, side: str, cache: Path) -> dict:
    """One load of ``repo`` by ``side`` in a fresh, offline process; the error text if it fails."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", HUB_CHILD, repo, side], capture_output=True, text=True, env=env, cwd=root
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def hub_main(args: argparse.Namespace) -> None:
    """Ours (quantize while reading the shards) against the peer (from_pretrained with BitsAndBytesConfig).

    Both load the same hub id from the same offline hub cache (random bf16 weights, 1 GB
    shards, written once); NF4 with double quantization, compute dtype bf16 on CUDA, fp32 on
    CPU. Peak host memory is VmHWM above the RSS after imports; on CUDA also
    ``max_memory_allocated``.
    """
    from safetensors import safe_open

    from bench.common import loadavg, machine_info

    cache = Path(args.cache).expanduser()
    start = time.perf_counter()
    repo, snapshot = hub_repo(cache, args.shape)
    written_s = round(time.perf_counter() - start, 1)  # only imports when an earlier run wrote it
    weights = sum(f.stat().st_size for f in snapshot.glob("*.safetensors"))
    elements = 0
    for file in snapshot.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names = f.keys()  # safe_open is not iterable
            elements += sum(math.prod(f.get_slice(name).get_shape()) for name in names)
    params = model_parameters(snapshot)
    rows = []
    order = ["ours", "peer", "peer", "ours"] * args.runs
    for side in order[: 2 * args.runs]:
        row = {"side": side, "loadavg_before": loadavg(), **measure_hub(repo, side, cache)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {
        # Without --cache/--out, which may hold machine-specific paths.
        "command": "python bench/lowmem.py --hub"
        + (f" --shape {args.shape}" if args.shape != "smollm2-1.7b" else "")
        + (f" --runs {args.runs}" if args.runs != 1 else ""),
        "model": {"repo_id": repo, "shape": args.shape, "config": HUB_SHAPES[args.shape]},
        "parameters": params,
        "fp32_mib": round(params * 4 / 2**20, 1),
        # Tied embeddings are stored twice (embed_tokens and lm_head), as state_dict() gives them.
        "checkpoint_elements": elements,
        "checkpoint_bf16_mib": round(weights / 2**20, 1),
        "shards": len(list(snapshot.glob("*.safetensors"))),
        "write_seconds_this_run": written_s,
        "machine": machine_info(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
