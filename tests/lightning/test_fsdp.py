"""FSDP-QLoRA: the 4-bit base sharded over 2 CPU processes (gloo) trains what DDP trains."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_qlora.lightning.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy, block_wrap_policy
from tests.conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[2]


def _fit(out: Path, *args: str) -> None:
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lightning" / "fsdp_fit.py"), str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _rng(folder: Path, name: str, rank: int) -> torch.Tensor:
    return torch.load(folder / f"{name}{rank}.pt", weights_only=True)


def test_fsdp_trains_the_adapters_ddp_trains_and_resumes(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    _fit(tmp_path / "ddp", "ddp")
    _fit(tmp_path / "fsdp", "fsdp")
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    fsdp = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    # The exported adapter is the same standard PEFT file, with the same values, bit for bit: over 2
    # ranks, gradients reduce-scattered over sharded weights are the same sum, halved, as DDP's
    # all-reduce, and AdamW works element by element on shards as on whole tensors.
    assert fsdp.keys() == ddp.keys() and len(fsdp) == 28
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in fsdp
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=0, atol=0, msg=name)
    assert any(t.abs().sum() > 0 for n, t in fsdp.items() if "lora_B" in n)  # trained

    # What a GPU run does: bf16 compute, storage "auto" (so bf16 too), the base quantized while loading
    # (inside configure_model, before convert_module), and validation during the fit. "auto" must be
    # resolved before configure_model packs the weights, or FSDP meets fp32-packed 4-bit weights beside
    # bf16 norms ("Must flatten tensors with uniform dtype").
    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base, safe_serialization=True)
    _fit(tmp_path / "bf16", "fsdp-bf16-lowmem", "", str(base))
    bf16 = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert bf16.keys() == ddp.keys() and {t.dtype for t in bf16.values()} == {torch.float32}
    assert all(t.abs().sum() > 0 and t.isfinite().all() for n, t in bf16.items() if "lora_B" in n)
    (meta,) = torch.load(tmp_path / "bf16" / "last.ckpt", weights_only=True)["lightning_qlora"]["models"].values()
    assert meta["quant"]["quant_storage"] == "bfloat16"

    # The checkpoint is adapter-only, by the names a DDP or single-device run uses.
    saved = torch.load(tmp_path / "fsdp" / "last.ckpt", weights_only=True)
    reference = torch.load(tmp_path / "ddp" / "last.ckpt", weights_only=True)
    assert saved["state_dict"].keys() == reference["state_dict"].keys() and len(saved["state_dict"]) == 28
    assert "lightning_qlora" in saved and saved["global_step"] == 6

    # Resuming loads those weights and the optimizer state into the shards.
    _fit(tmp_path / "resumed", "fsdp", str(tmp_path / "fsdp" / "last.ckpt"))
    start = torch.load(tmp_path / "resumed" / "start.pt", weights_only=True)
    assert start["global_step"] == 6 and set(start["optimizer_steps"]) == {6}
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(start["state"][name], value, rtol=0, atol=0, msg=name)
    # Each rank resumes its own RNG stream, not rank 0's.
    assert not torch.equal(_rng(tmp_path / "fsdp", "rng_saved", 0), _rng(tmp_path / "fsdp", "rng_saved", 1))
    for rank in (0, 1):
        assert torch.equal(_rng(tmp_path / "resumed", "rng_resumed", rank), _rng(tmp_path / "fsdp", "rng_saved", rank))
    # Saving, exporting and loading gathered only the adapters' units, never the 4-bit base.
    for folder in ("fsdp", "bf16", "resumed"):
        for rank in (0, 1):
            gathered = tmp_path / folder / f"gathered{rank}.txt"
            assert not gathered.exists(), gathered.read_text()


def test_fsdp_refuses_integer_storage_and_unshardable_models():
    with pytest.raises(ValueError, match=r"quant_storage='uint8': FSDP can only shard float storage"):
        QLoRAFSDPPlugin(quant_storage="uint8")
    with pytest.raises(ValueError, match=r"Sequential has no transformer block class .* or use trainer=ddp"):
        block_wrap_policy(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"state_dict_type='sharded'"):
        QLoRAFSDPStrategy(state_dict_type="sharded")


def test_qlora_plugin_points_to_the_fsdp_pair():
    from lightning_qlora import QLoRAPlugin

    # Checked in convert_module, before anything is quantized (no process group needed here).
    with pytest.raises(ValueError, match=r"QLoRAPlugin does not support QLoRAFSDPStrategy; .*QLoRAFSDPPlugin\(\)"):
        QLoRAPlugin()._check_strategy(QLoRAFSDPStrategy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_bf16_storage_on_gpu(tmp_path):
    """One GPU, world size 1: bf16 storage, the frozen rest in bf16, fp32 LoRA in its own units."""
    from transformers import LlamaForCausalLM

    from lightning_qlora import CausalLMModule, LoRAAdapters
    from tests.conftest import LossRecorder, counting_batches, loader, quiet_trainer, tiny_llama_config

    torch.manual_seed(0)
    plugin = QLoRAFSDPPlugin()
    losses = LossRecorder()
    trainer = quiet_trainer(
        accelerator="gpu",
        strategy=QLoRAFSDPStrategy(),
        plugins=[plugin],
        callbacks=[LoRAAdapters(r=8, alpha=16, export_dir=tmp_path / "adapter"), losses],
        max_steps=40,
    )
    trainer.fit(
        CausalLMModule(LlamaForCausalLM(tiny_llama_config()), lr=1e-2, warmup_steps=0), loader(counting_batches(40))
    )
    assert plugin.quant_config.quant_storage == torch.bfloat16
    assert losses.losses[-1] < 0.5 * losses.losses[0], losses.losses
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_moves_metric_states_to_the_root_device(tiny_llama):
    """Metric states are not parameters, so FSDP's wrapping leaves them where they are (on CPU in a
    CUDA run); the strategy must move them, as Lightning's own FSDP setup does."""
    from torchmetrics import MeanMetric

    from lightning_qlora import CausalLMModule, LoRAAdapters
    from tests.conftest import counting_batches, loader, quiet_trainer

    class Moves(MeanMetric):
        """Records where it is asked to go: on a CPU-only machine every device is the CPU."""

        def __init__(self) -> None:
            super().__init__()
            self.moves: list[torch.device] = []

        def to(self, *args, **kwargs):
            self.moves.append(torch.device(args[0] if args else kwargs["device"]))
            return super().to(*args, **kwargs)

    module = CausalLMModule(tiny_llama)
    module.val_choice_acc = Moves()
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=1,
        strategy=QLoRAFSDPStrategy(),
        plugins=[QLoRAFSDPPlugin()],
        callbacks=[LoRAAdapters(r=4, alpha=8)],
    )
    try:
        metrics = trainer.validate(module, loader(counting_batches(2, batch_size=2)), verbose=False)[0]
    finally:
        torch.distributed.destroy_process_group()
    assert module.val_choice_acc.moves == [trainer.strategy.root_device]
    assert torch.isfinite(torch.tensor(metrics["val_loss"]))


def test_fsdp_keeps_one_dtype_per_unit_whatever_the_compute_dtype(tiny_llama):
    # bf16 compute casts the embeddings to bf16; fp16 storage must still win for every frozen tensor,
    # or FSDP refuses to flatten the root unit ("Must flatten tensors with uniform dtype").
    plugin = QLoRAFSDPPlugin(compute_dtype="bf16", quant_storage="fp16")
    plugin.convert_module(tiny_llama)
    frozen = {p.dtype for p in tiny_llama.parameters() if not p.requires_grad}
    assert frozen == {torch.float16}
    assert {p.dtype for p in tiny_llama.parameters() if p.requires_grad} == {torch.float32}


def test_fsdp_refuses_int8_layers_up_front():
    with pytest.raises(ValueError, match=r"quant_type='int8' cannot be sharded by FSDP; use quant_type='nf4'"):
        QLoRAFSDPPlugin(quant_type="int8")
    with pytest.raises(ValueError, match=r"keep_high_precision=0.05 keeps layers in int8, .* or use trainer=ddp"):
        QLoRAFSDPPlugin(keep_high_precision=0.05)
    with pytest.raises(ValueError, match=r"int8_modules=\['model.layers.0.mlp.up_proj'\] keeps layers in int8"):
        QLoRAFSDPPlugin(int8_modules=["model.layers.0.mlp.up_proj"])


def test_fsdp_fp16_scales_the_loss_across_shards():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    # A plain GradScaler would find inf/NaN in this rank's shard only and step the others.
    plugin = QLoRAFSDPPlugin(compute_dtype="fp16")
    plugin._set_precision(torch.float16, torch.device("cuda"))
    assert isinstance(plugin.scaler, ShardedGradScaler) and plugin.precision == "16-mixed"


def test_resume_check_before_setup_accepts_the_storage_auto_resolves_to(tmp_path):
    from lightning_qlora.app.train import resolve_resume
    from lightning_qlora.lightning.checkpoint import META_KEY, plain_config

    # A GPU run with storage "auto" saved bfloat16; a fresh plugin only knows "auto" until setup.
    saved = QLoRAFSDPPlugin(quant_storage="bf16")
    meta = {"format": 1, "models": {"model": {"quant": plain_config(saved.quant_config), "adapter": {}}}}
    meta["models"]["model"]["adapter"] = plain_config(saved.adapter_config)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, META_KEY: meta}, path)
    assert resolve_resume(str(path), tmp_path, QLoRAFSDPPlugin()) == path
    # An explicit, different storage is still refused before anything loads.
    with pytest.raises(ValueError, match=r"another quant config; differences \(saved, now\): \{'quant_storage'"):
        resolve_resume(str(path), tmp_path, QLoRAFSDPPlugin(quant_storage="fp16"))
