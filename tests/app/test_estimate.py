import json
from pathlib import Path

import pytest
import torch

from lightning_qlora.app.estimate import auto_batch_size, estimate_memory, quantized_linear_bytes
from lightning_qlora.cli.estimate import main
from lightning_qlora.core.adapters import AdapterConfig, add_adapters
from lightning_qlora.core.quantize import quantize_model
from tests.conftest import tiny_llama_config

# The tiny config: hidden 64, intermediate 128, 2 layers, 4 heads of 16 (2 kv heads: kv width 32),
# vocab 64, untied head. Batch 2 x seq 16 = 32 tokens, LoRA r=8 with dropout 0.05, fp32; the live-set
# model of an allocator that reuses freed memory, and an fp32 load before quantizing.
TINY = dict(batch_size=2, seq_len=16, r=8, overhead_bytes=0, allocator="returning", low_memory=False)


def test_tiny_estimate_is_pinned_by_hand():
    est = estimate_memory(tiny_llama_config(), **TINY)
    # Quantized: 73,728 weights in 14 layers -> 53,360 B (as pinned in test_quantize);
    # unquantized: embeddings + head 2 x 64 x 64 fp32 = 32,768 B, five norms x 64 fp32 = 1,280 B.
    assert est.base_weights == 53_360 + 32_768 + 1_280
    # Per layer r x (in + out): q 8x128 + k 8x96 + v 8x96 + o 8x128 + gate/up/down 3 x 8x192 = 8,192; x 2 layers.
    assert est.adapters == est.gradients == 16_384 * 4
    assert est.optimizer == 16_384 * 8  # AdamW: two fp32 moments
    # Per token and layer, fp32: q, k, v, attention out, residual, gate, silu, up = 2x64 + 2x32 + 64 + 3x128 = 640
    # floats, + 4 heads' log-sum-exp + 2 norm scales = 2,584 B; adapters: mask and dropped input of every
    # input (6 x 64 + 128 = 512) x 2 x 4 B = 4,096 B, + 7 x r outputs of lora_A = 224 B -> 6,904 B.
    # Kept: (2 + 1) layer inputs x 64 + cos/sin 2 x 16 = 224 floats x 32 tokens = 28,672 B; plus
    # bitsandbytes' one dequantized weight, 128 x 64 x 4 = 32,768 B. Recomputing a layer adds
    # 32 x (6,904 + (2 x 128 + 2 x 64) x 4 gradient bytes) = 270,080 B; that beats the loss backward
    # (3 fp32 copies of 2 x 15 x 64 logits = 23,040 B), so the logits are gone at the peak.
    assert est.peak_at == "recompute of one checkpointed layer"
    assert est.activations == 28_672 + 32_768 + 270_080
    assert est.logits == 0
    assert est.total == 681_072
    assert est.setup_peak == 4 * 82_240  # every parameter in fp32, before quantizing


def test_without_checkpointing_every_layer_is_kept_and_the_head_matters():
    est = estimate_memory(tiny_llama_config(), gradient_checkpointing=False, **TINY)
    assert est.peak_at == "loss backward"
    # Kept + workspace + gathered hidden states (30 x 64 x 4) + 2 layers x 32 tokens x 6,904 B.
    assert est.activations == 28_672 + 32_768 + 7_680 + 441_856
    # The default chunked loss: two fp32 buffers of 30 scored positions x 64 vocab (the whole loss: 3).
    assert est.logits == 15_360
    answers = estimate_memory(tiny_llama_config(), gradient_checkpointing=False, answer_tokens=4, **TINY)
    assert answers.logits == 2 * (2 * 4) * 64 * 4
    whole = estimate_memory(tiny_llama_config(), gradient_checkpointing=False, **dict(TINY, loss_chunk_size=None))
    assert whole.logits == 23_040


def test_glibc_heap_keeps_a_steps_activations_and_their_gradients():
    kw = dict(TINY, allocator="glibc", reentrant=False)
    ckpt, full = (estimate_memory(tiny_llama_config(), gradient_checkpointing=g, **kw) for g in (True, False))
    # Per token and layer: the 2,584 B core; adapter inputs 512 floats dropped (2,048 B) and their
    # masks, one bit each inside checkpointed blocks (64 B) or fp32 outside (2,048 B); 224 B of lora_A
    # outputs. Gradients: (640 core + 512 adapter-input) floats = 4,608 B. Kept and workspace as above.
    assert ckpt.activations == 28_672 + 32_768 + 32 * 2 * (2_584 + 2_048 + 64 + 224)
    assert full.activations == 28_672 + 32_768 + 32 * 2 * (6_904 + 4_608)
    # The logits count in both: on the heap they stay, mapped they are alive at the loss backward.
    assert ckpt.logits == full.logits == 15_360
    assert ckpt.peak_at.startswith("loss backward")
    low = estimate_memory(tiny_llama_config(), **dict(kw, low_memory=True))
    assert low.setup_peak == low.base_weights + low.adapters + 3 * 128 * 64 * 4


def test_weights_and_adapters_match_what_quantize_and_add_adapters_build(tiny_llama):
    est = estimate_memory(tiny_llama.config, **TINY)
    report = quantize_model(tiny_llama)
    _, adapters = add_adapters(tiny_llama, AdapterConfig(r=8))
    unquantized = sum(p.numel() * p.element_size() for p in tiny_llama.parameters() if p.dtype == torch.float32)
    assert est.base_weights == report.bytes_after + unquantized - adapters.trainable * 4
    assert est.adapters == adapters.trainable * 4


def test_bits_per_weight_follow_the_formats():
    n = 4096 * 4096
    assert quantized_linear_bytes(4096, 4096, "nf4", True) * 8 / n == pytest.approx(4.127, abs=1e-3)
    assert quantized_linear_bytes(4096, 4096, "fp4", False) * 8 / n == pytest.approx(4.5, abs=1e-3)
    assert quantized_linear_bytes(4096, 4096, "int8", False) == n + 4 * 4096


def test_16bit_compute_halves_activations_and_frozen_weights():
    fp32 = estimate_memory(tiny_llama_config(), **TINY)
    bf16 = estimate_memory(tiny_llama_config(), compute_dtype="bf16", **TINY)
    assert bf16.base_weights == 53_360 + 32_768 // 2 + 1_280  # norms stay fp32
    assert bf16.adapters == fp32.adapters
    assert bf16.activations < 0.55 * fp32.activations


def test_auto_batch_size_picks_the_largest_micro_batch_that_fits():
    config = tiny_llama_config()
    two, four = (estimate_memory(config, **dict(TINY, batch_size=b)).total for b in (2, 4))
    kw = dict(r=8, overhead_bytes=0, allocator="returning")
    assert auto_batch_size(config, (two + four) // 2, 16, 8, **kw) == (2, 4)
    assert auto_batch_size(config, four, 16, 8, **kw) == (4, 2)
    assert auto_batch_size(config, 10**12, 16, 6, **kw) == (6, 1)
    with pytest.raises(ValueError, match=r"budget 0.0 GiB cannot be met: batch 1 needs 0.0 GiB; raise the budget"):
        auto_batch_size(config, 1000, 16, 8, **kw)
    with pytest.raises(ValueError, match="effective_batch should be a positive integer"):
        auto_batch_size(config, four, 16, 0, **kw)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(batch_size=0), "batch_size should be a positive integer, but got batch_size=0"),
        (dict(seq_len=-1), "seq_len should be a positive integer"),
        (dict(answer_tokens=17), "answer_tokens=17 should be between 1 and seq_len=16"),
        (dict(quant_type="int4"), "quant_type='int4' is unknown"),
        (dict(quant_type="int8", compute_dtype="bf16"), "int8' does not support compute_dtype=bf16"),
        (dict(optimizer="sgd"), "optimizer='sgd' is unknown"),
        (dict(allocator="jemalloc"), "allocator='jemalloc' is unknown"),
    ],
)
def test_bad_sizes_and_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_memory(tiny_llama_config(), **{**TINY, **kwargs})


def test_configs_load_from_a_directory_or_a_file_and_bad_ones_raise(tmp_path):
    from transformers import GPT2Config

    tiny_llama_config().save_pretrained(tmp_path / "model")
    expected = estimate_memory(tiny_llama_config(), **TINY).total
    assert estimate_memory(tmp_path / "model", **TINY).total == expected
    assert estimate_memory(tmp_path / "model" / "config.json", **TINY).total == expected
    with pytest.raises(ValueError, match="no config.json"):
        estimate_memory(tmp_path, **TINY)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        estimate_memory(GPT2Config(), **TINY)


def test_cli_prints_the_table_and_the_batch_split(tmp_path, capsys):
    tiny_llama_config().save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--batch-size", "2", "--seq-len", "16", "--r", "8"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 x seq 16" in out and "total" in out and "peak at loss backward" in out
    assert "measured within ±15%:" in out and "bench/results/estimate_vs_measured.json" in out
    assert (
        main(["--model", str(tmp_path / "config.json"), "--batch-size", "8", "--seq-len", "16", "--budget", "64"]) == 0
    )
    assert "micro batch 8 x gradient accumulation 1 = effective batch 8" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cannot be met"):
        main(["--model", str(tmp_path), "--budget", "0.01"])


def test_chunked_loss_holds_one_chunk_of_logits():
    whole, chunked, big, auto = (
        estimate_memory(tiny_llama_config(), gradient_checkpointing=False, **dict(TINY, loss_chunk_size=c))
        for c in (None, 5, 10_000, "auto")
    )
    # 2 rows x 15 scored positions at once, 3 fp32 copies; chunked: two buffers of 5 positions; a chunk
    # larger than the batch (auto's 1024 here) holds the batch.
    assert whole.logits == 3 * 30 * 64 * 4
    assert chunked.logits == 2 * 5 * 64 * 4
    assert big.logits == auto.logits == 2 * 30 * 64 * 4
    assert chunked.total == whole.total - (3 * 30 - 2 * 5) * 64 * 4
    assert estimate_memory(tiny_llama_config(), gradient_checkpointing=False, **TINY).total == auto.total  # default
    with pytest.raises(ValueError, match="loss_chunk_size=0: expected auto"):
        estimate_memory(tiny_llama_config(), **dict(TINY, loss_chunk_size=0))


def test_selective_checkpointing_counts_each_layer_as_it_runs():
    kw = dict(TINY, allocator="glibc", reentrant=False)
    every2 = estimate_memory(tiny_llama_config(), gradient_checkpointing=2, **kw)
    # Layer 0 is checkpointed (recomputed tensors, 1-bit masks: 4,920 B a token), layer 1 keeps its
    # forward's tensors and gradients (11,512 B a token), as in the all-or-nothing test above.
    assert every2.activations == 28_672 + 32_768 + 32 * (4_920 + 11_512)
    assert "every 2 layers" in every2.notes["activations"]
    four = tiny_llama_config(num_hidden_layers=4)
    totals = [estimate_memory(four, gradient_checkpointing=g, **kw).total for g in (True, 2, 4, False)]
    assert totals == sorted(totals) and len(set(totals)) == 4  # fewer checkpointed layers, more memory


def test_reentrant_checkpointing_keeps_a_measured_share_of_the_recompute():
    from lightning_qlora.app.estimate_activations import REENTRANT_HEAP_SHARE

    kw = dict(TINY, allocator="glibc")
    default, reentrant, plain = (
        estimate_memory(tiny_llama_config(), **kw),
        estimate_memory(tiny_llama_config(), reentrant=True, **kw),
        estimate_memory(tiny_llama_config(), reentrant=False, **kw),
    )
    assert default.total == reentrant.total  # the CPU default
    # The recomputed tensors (4,920 B a token and layer, as above), at the measured share.
    recomputed = 32 * 2 * 4_920
    assert plain.activations - reentrant.activations == pytest.approx((1 - REENTRANT_HEAP_SHARE) * recomputed, abs=1)


def test_offloading_moves_checkpointed_layer_inputs_off_the_accelerator():
    four = tiny_llama_config(num_hidden_layers=4)
    gpu = dict(TINY, allocator="returning", compute_dtype="bf16")
    plain, offloaded = (estimate_memory(four, offload_activations=o, **gpu) for o in (False, True))
    # 4 checkpointed layers' inputs leave, one comes back for its backward: 3 x 32 tokens x 64 x 2 B.
    assert plain.activations - offloaded.activations == 3 * 32 * 64 * 2
    assert "0 MiB of layer inputs offloaded to host memory" in offloaded.notes["activations"]
    # Every 2nd layer: 2 checkpointed inputs, one of them back at a time.
    every2 = [estimate_memory(four, gradient_checkpointing=2, offload_activations=o, **gpu) for o in (False, True)]
    assert every2[0].activations - every2[1].activations == 1 * 32 * 64 * 2
    # On CPU the activations already live in host memory: the same estimate, and a note saying so.
    cpu = [estimate_memory(four, offload_activations=o, **dict(TINY, allocator="glibc")) for o in (False, True)]
    assert cpu[0].total == cpu[1].total and "nothing moves on CPU" in cpu[1].notes["activations"]


def test_offloading_without_checkpointing_is_refused_as_a_run_refuses_it():
    with pytest.raises(ValueError, match="offload_activations=True needs gradient_checkpointing"):
        estimate_memory(tiny_llama_config(), gradient_checkpointing=False, offload_activations=True, **TINY)


def test_padding_free_adds_the_rows_block_causal_mask():
    from lightning_qlora.app.estimate import MASK_BYTES_PER_PAIR

    padded, packed = (estimate_memory(tiny_llama_config(), padding_free=p, **TINY) for p in (False, True))
    # One row of 2 x 16 = 32 tokens: 32 x 32 pairs of mask.
    assert packed.activations - padded.activations == MASK_BYTES_PER_PAIR * 32**2
    assert packed.notes["activations"].startswith("padding-free, batch 2 x seq 16")
    # The constant covers every measured point, within half a byte.
    points = json.loads((Path(__file__).parents[2] / "bench/results/padding-mask.json").read_text())["points"]
    measured = [p["bytes_per_token_pair"] for p in points]
    assert max(measured) <= MASK_BYTES_PER_PAIR <= max(measured) + 0.5
    assert min(p["tokens"] for p in points) >= 2048  # measured where the mask outgrows everything else
