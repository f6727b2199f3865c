"""What a CUDA run must show that the CPU suite cannot: run by ``scripts/gpu_check.sh`` on one GPU.

Every test is marked ``gpu`` and skipped where CUDA is absent. With ``LQ_GPU_CHECK_DEVICE=cpu`` the
same bodies run on CPU at tiny shapes (``gpu_check.sh --dry-run`` does this in CI), so the test code
itself is exercised before any device time is spent. What only CUDA has (fp16 with a GradScaler,
paged 8-bit AdamW, 16-bit compute after ``.cuda()``) is then skipped with the reason, after the
part of the body that CPU can run. Each test is sized for well under 30 s on an H200 (not yet timed there).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from bench.worker import LLAMA_1B, random_llama
from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin, QuantConfig, prepare, quantize_model
from lightning_qlora.core.quantize import has_native_bf16
from tests.conftest import LossRecorder, counting_batches, loader, quiet_trainer, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("LQ_GPU_CHECK_DEVICE", "cuda").strip().lower()
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"LQ_GPU_CHECK_DEVICE={DEVICE!r}: use 'cuda' (the default) or 'cpu' (tiny shapes, a dry run).")
ON_GPU = DEVICE == "cuda"
CPU_RUN = "CPU dry run (LQ_GPU_CHECK_DEVICE=cpu)"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        ON_GPU and not torch.cuda.is_available(),
        reason="needs a CUDA GPU; LQ_GPU_CHECK_DEVICE=cpu runs these bodies on CPU at tiny shapes",
    ),
]


@pytest.fixture(autouse=True)
def _time_limit_and_peak(record_property) -> Iterator[None]:
    """Fail a test that runs past ``LQ_GPU_TEST_TIMEOUT`` seconds (so the others still run); record its GPU peak."""
    limit = float(os.environ.get("LQ_GPU_TEST_TIMEOUT", "90"))
    armed = limit > 0 and threading.current_thread() is threading.main_thread()

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test ran past LQ_GPU_TEST_TIMEOUT={limit:g} s")

    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    previous = signal.signal(signal.SIGALRM, expire) if armed else None
    if armed:
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if ON_GPU:
            record_property("peak_gpu_mib", round(torch.cuda.max_memory_allocated() / 2**20, 1))


def _compute_dtype() -> torch.dtype:
    """What QLoRAPlugin's ``compute_dtype="auto"`` should pick here: bf16 on a GPU that has it, fp32 on CPU."""
    if not ON_GPU:
        return torch.float32
    return torch.bfloat16 if has_native_bf16("cuda") else torch.float16


def _tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def _trainer(plugin: Any, callbacks: list, steps: int, **kwargs: Any) -> L.Trainer:
    return quiet_trainer(
        accelerator="gpu" if ON_GPU else "cpu", plugins=[plugin], callbacks=callbacks, max_steps=steps, **kwargs
    )


def _fit(module: L.LightningModule, plugin: Any, steps: int, batches: list | None = None, callbacks: tuple = ()):
    """Fit ``module`` for ``steps`` on ``batches`` (default: the counting task); the trainer and its losses."""
    recorder = LossRecorder()
    trainer = _trainer(plugin, [recorder, *callbacks], steps)
    trainer.fit(module, loader(batches if batches is not None else counting_batches(steps)))
    assert len(recorder.losses) == steps and all(math.isfinite(x) for x in recorder.losses), recorder.losses
    return trainer, recorder.losses


def _steps(gpu: int, cpu: int) -> int:
    """Steps for a fit: enough to learn on the GPU; on CPU, enough to run every code path once."""
    return gpu if ON_GPU else cpu


def _falls(losses: list[float]) -> bool:
    """The loss fell: by a fifth over a GPU run's first and last 5 steps; at all over a short CPU run."""
    if not ON_GPU:
        return losses[-1] < losses[0]
    return sum(losses[-5:]) < 0.8 * sum(losses[:5])


def _to(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _token_batches(n: int, vocab: int, seq: int, batch: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` copies of one batch of counting rows (start, start+1, ... mod vocab): a fit memorizes it fast."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, vocab, (batch, 1), generator=g) + torch.arange(seq)) % vocab
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return [one] * n


class _TrainStart(L.Callback):
    """The trainable tensors as training starts (after a resume has loaded its checkpoint)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def test_bf16_step_validation_and_resume_at_1b(tmp_path, record_property):
    """About 1B parameters drawn on the GPU: a bf16 fit with validation, adapter-only checkpoints, a resume."""
    import bitsandbytes as bnb
    from lightning.pytorch.callbacks import ModelCheckpoint

    shape, seq, dtype = (LLAMA_1B, 256, torch.bfloat16) if ON_GPU else (tiny_llama_config(), 16, torch.float32)
    vocab = LLAMA_1B["vocab_size"] if ON_GPU else shape.vocab_size
    train, val = _token_batches(4, vocab, seq, seed=0), _token_batches(1, vocab, seq, seed=1)

    def run(directory: Path, ckpt_path: Path | None = None):
        L.seed_everything(0)
        # Same seed, same bits: the resumed run's base must match the checkpoint's fingerprint.
        model = random_llama(shape, DEVICE, dtype, seed=0, std=0.02 if ON_GPU else 0.3)
        record_property("params", sum(p.numel() for p in model.parameters()))  # before 4-bit packing halves it
        module = CausalLMModule(model, lr=5e-3, warmup_steps=0, min_lr_ratio=1.0)
        plugin, recorder, start = QLoRAPlugin(), LossRecorder(), _TrainStart()
        checkpoints = ModelCheckpoint(dirpath=directory, every_n_train_steps=2, save_top_k=-1)
        # dropout > 0: the resumed run must draw the masks the uninterrupted one drew (CUDA RNG restored).
        adapters = LoRAAdapters(r=16, alpha=32, dropout=0.1)
        trainer = _trainer(
            plugin,
            [adapters, checkpoints, recorder, start],
            4,
            enable_checkpointing=True,
            val_check_interval=2,
            limit_val_batches=1,
        )
        began = time.perf_counter()
        trainer.fit(module, loader(train), loader(val), ckpt_path=ckpt_path, weights_only=True)
        return model, plugin, trainer, recorder.losses, start.state, time.perf_counter() - began

    model, plugin, trainer, full, _, seconds = run(tmp_path / "a")
    record_property("fit_s", round(seconds, 2))
    record_property("losses", json.dumps([round(x, 5) for x in full]))
    compute = _compute_dtype()
    assert plugin.compute_dtype == compute and plugin.precision == ("bf16-mixed" if ON_GPU else "32-true")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.compute_dtype == compute
    assert layer.base_layer.weight.device.type == DEVICE and layer.lora_A["default"].weight.dtype == torch.float32
    assert len(full) == 4 and all(math.isfinite(x) for x in full) and full[-1] < full[0], full
    metrics = trainer.callback_metrics
    assert {"val_loss", "val_token_acc"} <= metrics.keys() and math.isfinite(float(metrics["val_loss"]))

    step2 = tmp_path / "a" / "epoch=0-step=2.ckpt"
    saved = torch.load(step2, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["state_dict"]
    assert all(".lora_A." in k or ".lora_B." in k for k in saved["state_dict"])  # adapter-only
    del model, plugin, trainer

    _, _, resumed_trainer, resumed, start, _ = run(tmp_path / "b", step2)
    assert resumed_trainer.global_step == 4 and len(resumed) == 2
    # The adapters start exactly where the checkpoint left them ...
    assert start.keys() == saved["state_dict"].keys()
    for name, value in saved["state_dict"].items():
        assert torch.equal(start[name], value), name
    # ... and steps 3-4 repeat the uninterrupted run's (GPU kernels may differ in the last bits).
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[2:]), rtol=1e-2, atol=1e-2)


def test_fp16_compute_with_a_grad_scaler():
    """``compute_dtype="fp16"``: a GradScaler is set up and the loss still falls."""
    import bitsandbytes as bnb

    L.seed_everything(0)
    model = _tiny_model()
    plugin = QLoRAPlugin(compute_dtype="fp16" if ON_GPU else "fp32")
    _, losses = _fit(CausalLMModule(model, lr=1e-2, warmup_steps=5), plugin, _steps(80, 6))
    assert _falls(losses), losses
    layer = model.model.layers[0].mlp.down_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == DEVICE
    if not ON_GPU:
        assert plugin.scaler is None
        pytest.skip(f"{CPU_RUN}: ran the fit in fp32; fp16 autocast with a GradScaler is CUDA-only")
    assert isinstance(plugin.scaler, torch.amp.GradScaler), type(plugin.scaler)
    assert plugin.precision == "16-mixed" and plugin.compute_dtype == torch.float16
    assert layer.compute_dtype == torch.float16
    assert 0 < plugin.scaler.get_scale() < float("inf")


def test_paged_adamw_8bit():
    """``optimizer="paged_adamw_8bit"``: bitsandbytes' paged 8-bit AdamW trains the adapters."""
    import bitsandbytes as bnb

    L.seed_everything(0)
    if ON_GPU:
        # Adapters of 64 x 2048 = 131,072 elements: bnb keeps 8-bit state from 4,096 and pages it from 100,000.
        shape = dict(LLAMA_1B, num_hidden_layers=2, intermediate_size=5632, vocab_size=1024)
        model = random_llama(shape, DEVICE, torch.bfloat16, seed=0)
        r, optimizer, batches = 64, "paged_adamw_8bit", _token_batches(12, 1024, 128)
    else:
        model, r, optimizer, batches = _tiny_model(), 8, "adamw", _token_batches(4, 64, 16)
    module = CausalLMModule(model, lr=2e-3, warmup_steps=0, min_lr_ratio=1.0, optimizer=optimizer)
    trainer, losses = _fit(module, QLoRAPlugin(), len(batches), batches, callbacks=(LoRAAdapters(r=r, alpha=2 * r),))
    assert losses[-1] < losses[0], losses
    if not ON_GPU:
        pytest.skip(f"{CPU_RUN}: ran the fit with adamw; paged 8-bit AdamW needs CUDA")
    opt = trainer.optimizers[0]
    assert isinstance(opt, bnb.optim.PagedAdamW8bit), type(opt)
    states = [opt.state[p] for g in opt.param_groups for p in g["params"] if opt.state.get(p)]
    eight = [s for s in states if getattr(s.get("state1"), "dtype", None) == torch.uint8]
    assert eight, "no adapter got 8-bit optimizer state"
    assert any(getattr(s["state1"], "is_paged", False) for s in eight), "no optimizer state was paged"


def test_export_and_merge_on_gpu(tmp_path):
    """An adapter trained on the GPU exports as standard PEFT, reloads there, and merges (on the GPU and as shipped)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_qlora.io.export import read_metadata
    from lightning_qlora.io.merge import dequantize_model, merge

    L.seed_everything(0)
    model = _tiny_model()
    model.save_pretrained(tmp_path / "base")  # the fp32 base as a user has it on disk
    plugin = QLoRAPlugin()
    adapters = LoRAAdapters(r=8, alpha=16, dropout=0.0, export_dir=tmp_path / "adapter")
    _fit(CausalLMModule(model, lr=1e-2, warmup_steps=0), plugin, _steps(30, 8), callbacks=(adapters,))
    assert read_metadata(tmp_path / "adapter")["quant"]["quant_type"] == "nf4"
    ids = counting_batches(1, seed=3)[0]["input_ids"].to(DEVICE)
    # Outside Lightning, the plugin's own forward context gives the autocast a training step ran in.
    context = plugin.forward_context
    tol = 0.05 if ON_GPU else 1e-3  # bf16 compute on the GPU; fp32 on CPU

    def logits(m) -> torch.Tensor:
        with torch.no_grad(), context():
            return m.eval()(input_ids=ids).logits.float()

    ours = logits(model)

    def quantized_base():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        quantize_model(base, QuantConfig(), DEVICE)
        return base.to(DEVICE)  # quantize_model places only the quantized layers

    # Stock PEFT on a base quantized on this device.
    stock = PeftModel.from_pretrained(quantized_base(), tmp_path / "adapter")
    stock_logits = logits(stock)
    with torch.no_grad(), context(), stock.disable_adapter():
        plain = stock.eval()(input_ids=ids).logits.float()
    assert _rel(stock_logits, ours) < tol
    assert _rel(plain, ours) > 6 * tol  # the adapter matters (~1.1 here after 30 steps), so the matches mean something

    # Merge on the device: dequantize there (export.dequantize_model), then PEFT's merge.
    base = quantized_base()
    assert dequantize_model(base) == 14
    dense = base.model.layers[0].self_attn.q_proj
    assert type(dense) is torch.nn.Linear and dense.weight.device.type == DEVICE
    merged_here = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    assert _rel(logits(merged_here), ours) < tol

    # The shipped merge (it quantizes the base on CPU, as training on any device did), loaded here.
    out = merge(tmp_path / "adapter", tmp_path / "merged", base=str(tmp_path / "base"), dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(DEVICE)
    merged_logits = logits(merged)
    assert _rel(merged_logits, ours) < max(tol, 0.02)  # bf16 weights
    assert (merged_logits.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


LOWMEM_PEAK = """
import json, sys, torch
from lightning_qlora.core.lowmem import load_quantized

def status(key):
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) / 1024

path, warm, device = sys.argv[1:4]
# Warm up on a tiny model first: the CUDA context, bitsandbytes' kernels and transformers' Llama
# code take host memory once per process, and are not what loading a model costs.
load_quantized(warm, device=device)
base = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak mark (VmHWM) to now
    reset = True
except OSError:
    reset = False
model, report = load_quantized(path, device=device)
if device == "cuda":
    torch.cuda.synchronize()
print(json.dumps({
    "peak_mib": status("VmHWM") - base,
    "reset": reset,
    "devices": sorted({t.device.type for t in [*model.parameters(), *model.buffers()]}),
    "quantized": len(report.quantized),
}))
"""


def test_low_memory_load_straight_to_the_gpu(tmp_path, record_property):
    """``load_quantized(path, device="cuda")``: every weight ends on the GPU; the host never holds the fp32 model."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    from lightning_qlora.core.lowmem import load_quantized
    from lightning_qlora.io.models import load_model

    layers = 6 if ON_GPU else 2
    if ON_GPU:
        # 6 x 16.8M quantized weights: 403 MB in fp32, against ~50 MB of one tensor, embeddings and head.
        overrides = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=16)
        config = tiny_llama_config(num_hidden_layers=layers, vocab_size=2000, initializer_range=0.02, **overrides)
    else:
        config = tiny_llama_config()
    torch.manual_seed(0)
    big = LlamaForCausalLM(config)
    linear_fp32 = sum(
        m.weight.numel() * 4 for n, m in big.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    big.save_pretrained(tmp_path / "model", safe_serialization=True)
    del big
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "warm", safe_serialization=True)

    script = [sys.executable, "-c", LOWMEM_PEAK, str(tmp_path / "model"), str(tmp_path / "warm"), DEVICE]
    done = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    record_property("lowmem", json.dumps({**result, "linear_fp32_mib": round(linear_fp32 / 2**20, 1)}))
    assert result["quantized"] == 7 * layers and result["devices"] == [DEVICE], result
    if ON_GPU and result["reset"]:
        # Quantizing as it reads, the host holds one fp32 tensor at a time, not all of them.
        assert result["peak_mib"] < 0.25 * linear_fp32 / 2**20, result

    # The same packed weights as loading whole and quantizing on the device.
    low, _ = load_quantized(tmp_path / "model", device=DEVICE)
    std = load_model(tmp_path / "model")
    quantize_model(std, QuantConfig(), DEVICE)
    std.to(DEVICE)
    a, b = low.model.layers[1].mlp.down_proj.weight, std.model.layers[1].mlp.down_proj.weight
    assert isinstance(low.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit) and a.device.type == DEVICE
    assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    ids = torch.arange(12, device=DEVICE)[None]
    with torch.no_grad():
        torch.testing.assert_close(low(input_ids=ids).logits, std(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    if not ON_GPU:
        pytest.skip(f"{CPU_RUN}: loaded to CPU at a tiny shape; the host-memory bound is checked at the GPU shape")


def test_int8_layers_fit():
    """``quant_type="int8"``: LLM.int8 layers on the device, and one short fit that learns."""
    import bitsandbytes as bnb

    L.seed_everything(0)
    model = _tiny_model()
    plugin = QLoRAPlugin(quant_type="int8")
    _, losses = _fit(CausalLMModule(model, lr=1e-2, warmup_steps=0), plugin, _steps(30, 6))
    assert _falls(losses), losses
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    assert layer.weight.device.type == DEVICE
    # LLM.int8 multiplies in fp16 on a GPU (QuantConfig refuses bf16 with it), so a GradScaler comes along.
    expected = torch.float16 if ON_GPU else torch.float32
    assert plugin.compute_dtype == expected
    assert isinstance(plugin.scaler, torch.amp.GradScaler) if ON_GPU else plugin.scaler is None


def test_int8_sample_answers_after_validation_run_on_the_device():
    """The CLI's before/after answers: Lightning's teardown leaves the module on CPU, and int8 layers keep
    their quantization state where they were quantized; the answers are generated back on the device."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lightning_qlora.app.train import _answers
    from tests.conftest import VOCAB

    L.seed_everything(0)
    module = CausalLMModule(_tiny_model(), lr=1e-2, warmup_steps=0)
    trainer, _ = _fit(module, QLoRAPlugin(quant_type="int8"), 2)
    trainer.validate(module, loader(counting_batches(1)), verbose=False)
    words = Tokenizer(models.WordLevel({str(i): i for i in range(VOCAB)}, unk_token="1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="1", pad_token="0", eos_token="2")
    task = SimpleNamespace(to_pair=lambda row: (row["prompt"], ""))
    answers = _answers(trainer, module, tokenizer, task, [{"prompt": "5 6 7 8"}], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert {p.device.type for p in module.parameters()} == {DEVICE}


def test_prepare_on_cpu_then_cuda_computes_in_16_bit():
    """``prepare()`` on a CPU model, then ``.cuda()``: forward and backward run; the 4-bit layers compute in 16 bits.

    The compute dtype should follow the device the layers run on (fp32 is right on CPU, where prepare()
    quantized them, and wrong on the GPU).
    """
    import bitsandbytes as bnb

    L.seed_everything(0)
    model = _tiny_model()
    peft_model = prepare(model, r=8, alpha=16, dropout=0.05, verbose=False)
    peft_model.to(DEVICE)
    peft_model.train()
    out = peft_model(**_to(counting_batches(1)[0]), use_cache=False)
    assert math.isfinite(float(out.loss))
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14 and all(m.weight.device.type == DEVICE for m in layers.values())
    dtypes = {n: m.compute_dtype for n, m in layers.items()}
    if not ON_GPU:
        assert set(dtypes.values()) == {torch.float32}
        pytest.skip(f"{CPU_RUN}: forward and backward ran on CPU (fp32 compute, as it should be there)")
    wrong = {n: str(d) for n, d in dtypes.items() if d not in (torch.bfloat16, torch.float16)}
    assert not wrong, f"4-bit layers still compute in 32 bits on the GPU: {wrong}"


def _memory_lever_step(offload: bool, chunk: int | str | None, seq: int) -> tuple[float, float]:
    """One training step of a 1B-shaped QLoRA model at batch 1 x ``seq``; its loss and peak memory (MiB)."""
    from lightning_qlora.core.adapters import AdapterConfig, add_adapters

    shape = LLAMA_1B if ON_GPU else tiny_llama_config().to_dict()
    model = random_llama(shape, DEVICE, _compute_dtype(), seed=0)
    quantize_model(model, QuantConfig(compute_dtype=_compute_dtype()))
    torch.manual_seed(1)
    add_adapters(model, AdapterConfig(dropout=0.0, offload_activations=offload))
    model.train()
    module = CausalLMModule(model, loss_chunk_size=chunk)
    vocab = model.config.vocab_size
    batch = _to(_token_batches(1, vocab, seq if ON_GPU else 16, batch=1)[0])
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    nll, count = module._loss_sums(batch)
    (nll / count).backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if ON_GPU else 0.0
    return float(nll / count), peak


def test_memory_levers_on_the_device(record_property):
    """Activation offloading and the chunked loss: the same loss as without, less device memory."""
    seq = 4096
    plain_loss, plain = _memory_lever_step(False, None, seq)
    off_loss, offloaded = _memory_lever_step(True, None, seq)
    chunk_loss, chunked = _memory_lever_step(False, "auto", seq)
    record_property("peak_mib_plain_offload_chunked", [round(plain), round(offloaded), round(chunked)])
    assert off_loss == pytest.approx(plain_loss, rel=1e-3) and chunk_loss == pytest.approx(plain_loss, rel=1e-3)
    if ON_GPU:
        assert offloaded < plain and chunked < plain, (plain, offloaded, chunked)
