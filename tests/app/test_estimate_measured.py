"""The estimate against one real CPU run through QLoRAPlugin + Trainer, measured in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_qlora.app.estimate import estimate_memory
from tests.conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[2]
# 4 layers at width 256 and a 8,000-token vocabulary: big enough that activations and logits are
# over a third of the peak (dropping either term misses the band), small enough for ~20 s on 2 cores.
SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=8000,
    max_position_embeddings=1024,
    initializer_range=0.02,
)
RUN = dict(batch=4, seq=512, checkpointing=False, answer=None, steps=3)


def test_estimate_is_within_15_percent_of_a_measured_run(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**SHAPE)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    spec = json.dumps(dict(RUN, folder=str(tmp_path)))
    argv = [sys.executable, str(ROOT / "bench" / "estimate_vs_measured.py"), "--child", spec]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"] * 2**20
    est = estimate_memory(config, batch_size=RUN["batch"], seq_len=RUN["seq"], gradient_checkpointing=False)
    predicted = max(est.total, est.setup_peak)
    # The terms that scale with the batch must matter here, or the test could not catch their loss.
    assert est.activations + est.logits > 0.3 * predicted
    assert predicted / measured == pytest.approx(1, abs=0.15), (predicted / 2**20, measured / 2**20, est.table())
