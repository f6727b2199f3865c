"""The benchmark harness measures like for like: both sides run, report the same fields, and start at the same loss.

Not a timing test: three steps of a tiny random Llama, both workers at once (< 60 s on 2 cores).
"""

from __future__ import annotations

import concurrent.futures
import math

import pytest

from bench.run import alternating, markdown, parse_result, run_worker, speed_result
from tests.conftest import tiny_llama_config

FIELDS = (
    "median_step_s",
    "median_step_cpu_s",
    "tokens_per_s",
    "peak_rss_mib",
    "train_peak_rss_mib",
    "trainable_params",
    "gradient_checkpointing",
    "bnb_cpu_kernel",
    "losses",
    "step_s",
    "loadavg_before",
    "loadavg_after",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # The suite's tiny Llama, with transformers' default init and no pad id, as a real checkpoint has.
    config = tiny_llama_config(vocab_size=256, initializer_range=0.02, pad_token_id=None)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def records(tiny_dir):
    argv = [
        "speed",
        "--model",
        tiny_dir,
        "--steps",
        "3",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--seq",
        "16",
        "--threads",
        "1",
    ]
    # Both sides at once: this test checks results, not timings.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {side: pool.submit(run_worker, [*argv, "--side", side], 1, 300) for side in ("ours", "peer")}
        return {side: [f.result()] for side, f in futures.items()}


def test_both_sides_report_every_field(records):
    for side, (rec,) in records.items():
        assert rec["side"] == side
        missing = [k for k in FIELDS if rec.get(k) is None]
        assert not missing, f"{side} lacks {missing}"
        assert len(rec["losses"]) == 3 and len(rec["step_s"]) == 2  # the warmup step is not timed
        assert rec["tokens_per_s"] == pytest.approx(2 * 16 / rec["median_step_s"])
        assert rec["peak_rss_mib"] >= max(rec["train_peak_rss_mib"], rec["setup_peak_rss_mib"]) > 0
        assert rec["threads"] == 1 and rec["gc"] is True
    ours, peer = records["ours"][0], records["peer"][0]
    # The same LoRA on both sides: r * (in + out) over q, k, v, o, gate, up, down of 2 layers; not the head.
    dims = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert ours["trainable_params"] == peer["trainable_params"] == 2 * sum(16 * (i + o) for i, o in dims)
    # Ours forces bnb's AVX512-BF16 repacking off; in training neither side may have repacked.
    assert ours["bnb_cpu_kernel"]["support_avx512bf16_for_cpu"] == 0
    assert ours["bnb_cpu_kernel_after"]["repacked_for_cpu"] == peer["bnb_cpu_kernel_after"]["repacked_for_cpu"] == 0


def test_first_losses_agree(records):
    # Same weights, same NF4 quantization, same batch, B = 0: the two stacks compute the same loss.
    ours, peer = records["ours"][0]["losses"], records["peer"][0]["losses"]
    assert ours[0] == pytest.approx(peer[0], abs=1e-6)
    assert math.log(256) - 0.5 < ours[0] < math.log(256) + 0.5  # a random model on random tokens


def test_ratios_and_table(records):
    meta = {"case": "cpu", "device": "cpu"}
    result = speed_result(records, meta)
    ratios = result["ratio_ours_over_peer"]
    o, p = result["ours"], result["peer"]
    for key in ("median_step_s", "tokens_per_s", "peak_rss_mib", "train_peak_rss_mib"):
        assert ratios[key] == pytest.approx(o[key] / p[key], rel=1e-3)
    assert result["first_loss_abs_diff"] <= 1e-6
    assert set(result["targets"]) >= {"step_time_met", "memory_met"}
    assert "| median step (s) |" in markdown(result)


def test_alternation_and_parsing():
    assert alternating(3, ("ours", "peer")) == ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert parse_result('noise\n{"side": "ours"}\n') == {"side": "ours"}
    with pytest.raises(ValueError, match="no JSON"):
        parse_result("Traceback ...")
