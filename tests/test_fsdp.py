"""FSDP-QLoRA: the 4-bit base sharded over 2 CPU processes (gloo) trains what DDP trains."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_qlora.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy, block_wrap_policy

ROOT = Path(__file__).resolve().parents[1]


def _fit(out: Path, *args: str) -> None:
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_fit.py"), str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_fsdp_trains_the_adapters_ddp_trains_and_resumes(tmp_path):
    _fit(tmp_path / "ddp", "ddp")
    _fit(tmp_path / "fsdp", "fsdp")
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    fsdp = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    # The exported adapter is the same standard PEFT file, with the same values: gradients
    # reduce-scattered over sharded weights average as DDP's all-reduce does.
    assert fsdp.keys() == ddp.keys() and len(fsdp) == 28
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in fsdp
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=0, atol=1e-6, msg=name)
    assert any(t.abs().sum() > 0 for n, t in fsdp.items() if "lora_B" in n)  # trained

    # bf16 storage (what a GPU run uses): the frozen rest in bf16, the adapters kept in fp32.
    _fit(tmp_path / "bf16", "fsdp-bf16")
    bf16 = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert bf16.keys() == ddp.keys() and {t.dtype for t in bf16.values()} == {torch.float32}
    assert all(t.abs().sum() > 0 for n, t in bf16.items() if "lora_B" in n)

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
