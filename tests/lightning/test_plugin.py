import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from peft import PeftModel
from torch import nn

from lightning_qlora import CausalLMModule, CPUOptions, LoRAAdapters, QLoRAPlugin
from lightning_qlora.core.quantize import QuantConfig, quantize_model
from tests.conftest import LossRecorder, counting_batches, loader, quiet_trainer, tiny_llama_config


def _fit(module, callbacks=(), steps=80, plugin=None, **plugin_kwargs):
    recorder = LossRecorder()
    plugin = plugin or QLoRAPlugin(**plugin_kwargs)
    trainer = quiet_trainer(plugins=[plugin], callbacks=[recorder, *callbacks], max_steps=steps)
    trainer.fit(module, loader(counting_batches(steps)))
    return trainer, recorder.losses


def test_plugin_alone_learns_the_counting_task(tiny_llama):
    L.seed_everything(0)
    module = CausalLMModule(tiny_llama, lr=1e-2, warmup_steps=5)
    trainer, losses = _fit(module)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 80
    # Above ln(64)=4.16: the wide random init (0.3) makes confident wrong guesses at first.
    assert start == pytest.approx(6.30, abs=0.05)
    assert end < 0.6 * start
    # Every targeted Linear is a 4-bit layer wrapped by LoRA, and only adapters train.
    for name, m in tiny_llama.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            assert isinstance(m.base_layer, bnb.nn.Linear4bit), name
    trainable = [n for n, p in tiny_llama.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # The optimizer holds exactly the trainable parameters.
    opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == len(trainable) == 28
    assert all(p.requires_grad for p in opt_params)


def test_callback_spec_wins_whatever_the_order(tiny_llama):
    recorder = LossRecorder()
    spec = LoRAAdapters(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    # The callback comes first in one list and last in another; the plugin reads it either way.
    for callbacks in ([spec, recorder], [recorder, spec]):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(tiny_llama_config())
        plugin = QLoRAPlugin()
        trainer = quiet_trainer(plugins=[plugin], callbacks=callbacks, max_steps=2)
        trainer.fit(CausalLMModule(model), loader(counting_batches(2)))
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.r["default"] == 4
        assert not hasattr(model.model.layers[0].mlp.up_proj, "lora_A")
        assert plugin.adapter_reports["model"].trainable == 2 * 2 * 4 * (64 + 64) - 2 * 4 * (64 - 32)


class BuildsInConfigureModel(CausalLMModule):
    def __init__(self):
        super().__init__(model="unused", lr=1e-2, warmup_steps=5)

    def configure_model(self):
        if self.model is None:
            from transformers import LlamaForCausalLM

            torch.manual_seed(0)
            self.model = LlamaForCausalLM(tiny_llama_config())


def test_model_built_in_configure_model():
    L.seed_everything(0)
    module = BuildsInConfigureModel()
    assert module.model is None
    _, losses = _fit(module, steps=40)
    assert isinstance(module.model.model.layers[1].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_fit_then_test_does_not_inject_twice(tiny_llama):
    module = CausalLMModule(tiny_llama)
    trainer, _ = _fit(module, steps=2)
    n_lora = sum("lora_A" in n for n, _ in tiny_llama.named_modules())
    batch = counting_batches(1, seed=4)[0]
    trainer.test(module, loader([batch]), verbose=False)
    assert sum("lora_A" in n for n, _ in tiny_llama.named_modules()) == n_lora
    # The test scored the trained model once: its mean NLL, by transformers' own loss.
    tiny_llama.eval()
    with torch.no_grad():
        expected = float(tiny_llama(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    assert float(trainer.callback_metrics["test_loss"]) == pytest.approx(expected, abs=1e-4)


def test_export_is_standard_peft_and_reloads(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    module = CausalLMModule(tiny_llama, lr=1e-2, warmup_steps=0)
    _fit(module, callbacks=[LoRAAdapters(r=8, alpha=16, dropout=0.0, export_dir=tmp_path)], steps=10)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    tiny_llama.eval()
    batch = counting_batches(1, seed=3)[0]
    with torch.no_grad():
        ours = tiny_llama(input_ids=batch["input_ids"]).logits
    # A fresh base, quantized the same way, plus the exported adapter through stock PEFT.
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    quantize_model(base, QuantConfig())
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        theirs = reloaded(input_ids=batch["input_ids"]).logits
        with reloaded.disable_adapter():
            plain = reloaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-3  # the adapter did learn something


def test_precision_and_plugin_together_say_what_to_do():
    with pytest.raises(ValueError, match=r"remove `precision=` from Trainer and pass QLoRAPlugin\(compute_dtype=...\)"):
        L.Trainer(precision="bf16-mixed", plugins=[QLoRAPlugin()], accelerator="cpu", logger=False)


def test_lora_adapters_without_plugin_is_refused(tiny_llama):
    trainer = quiet_trainer(callbacks=[LoRAAdapters()], max_steps=1)
    with pytest.raises(ValueError, match=r"LoRAAdapters needs QLoRAPlugin.*plugins=\[QLoRAPlugin\(\)\]"):
        trainer.fit(CausalLMModule(tiny_llama), loader(counting_batches(1)))


def test_unsupported_strategy_is_refused(tiny_llama):
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = quiet_trainer(plugins=[QLoRAPlugin()], strategy=ModelParallelStrategy(), max_steps=1)
    with pytest.raises(ValueError, match=r"QLoRAPlugin does not support ModelParallelStrategy; .*QLoRAFSDPStrategy"):
        trainer.fit(CausalLMModule(tiny_llama), loader(counting_batches(1)))


def test_model_without_linear_layers_is_refused_at_setup():
    class NoLinear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

        def training_step(self, batch, batch_idx):
            return self.conv(batch["input_ids"].float()[:, None, :4].expand(-1, 4, -1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(plugins=[QLoRAPlugin()], max_steps=1)
    with pytest.raises(TypeError, match="no nn.Linear layer to quantize"):
        trainer.fit(NoLinear(), loader(counting_batches(1)))


def test_no_trainable_parameters_is_explained(tiny_llama):
    trainer = quiet_trainer(max_steps=1)
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainer.fit(CausalLMModule(tiny_llama), loader(counting_batches(1)))


def test_paged_optimizer_needs_cuda(tiny_llama):
    trainer = quiet_trainer(plugins=[QLoRAPlugin()], max_steps=1)
    with pytest.raises(ValueError, match="paged_adamw_8bit' needs a CUDA device"):
        trainer.fit(CausalLMModule(tiny_llama, optimizer="paged_adamw_8bit"), loader(counting_batches(1)))


def test_cpu_precision_is_fp32(tiny_llama):
    plugin = QLoRAPlugin()
    trainer = quiet_trainer(plugins=[plugin], max_steps=1)
    trainer.fit(CausalLMModule(tiny_llama), loader(counting_batches(1)))
    assert plugin.compute_dtype == torch.float32 and plugin.precision == "32-true"
    assert tiny_llama.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.float32


def _fit_dropout_llama(steps: int, plugin=None, **plugin_kwargs):
    """A fresh tiny Llama fitted with LoRA dropout 0.1 and checkpointing: the model and its losses."""
    from transformers import LlamaForCausalLM

    L.seed_everything(0)
    model = LlamaForCausalLM(tiny_llama_config())
    module = CausalLMModule(model, lr=1e-2, warmup_steps=5)
    adapters = LoRAAdapters(r=8, alpha=16, dropout=0.1, gradient_checkpointing=True)
    return model, _fit(module, [adapters], steps=steps, plugin=plugin, **plugin_kwargs)[1]


def test_cpu_reuse_of_the_recompute_changes_no_loss():
    runs = {}
    for reuse in (False, True):
        model, runs[reuse] = _fit_dropout_llama(6, cpu=CPUOptions(reuse_recompute=reuse, fast_dropout=False))
        kinds = {type(m).__name__ for m in model.modules()}
        assert ({"ReuseLinear4bit", "ReplayDropout"} <= kinds) == reuse
    assert runs[True] == runs[False]  # every loss, bit for bit (dropout on: the masks are replayed)


def test_cpu_fast_dropout_learns_like_torch_dropout():
    runs = {}
    for fast in (False, True):
        model, runs[fast] = _fit_dropout_llama(40, cpu=CPUOptions(fast_dropout=fast))
        drops = [m for m in model.modules() if type(m).__name__ == "ReplayDropout"]
        assert len(drops) == 14 and all(d.fast_masks == fast for d in drops)
    torch_masks, fast_masks = runs[False], runs[True]
    assert fast_masks[0] == torch_masks[0]  # LoRA B starts at 0: the first step cannot see the masks
    assert fast_masks[1:] != torch_masks[1:]  # another mask stream
    end = [sum(losses[-10:]) / 10 for losses in (torch_masks, fast_masks)]
    # Two random streams: 0.752 (torch) and 0.783 (fast) here. The distribution is pinned in test_dropout.py.
    assert end[0] < 0.2 * torch_masks[0] and end[1] == pytest.approx(end[0], rel=0.15)


def test_gradient_clipping_with_the_fused_cpu_optimizer(tiny_llama):
    # CPU AdamW is fused; Lightning's MixedPrecision refuses to clip for any fused optimizer.
    plugin = QLoRAPlugin()
    trainer = quiet_trainer(plugins=[plugin], max_steps=3, gradient_clip_val=0.05)
    trainer.fit(CausalLMModule(tiny_llama, lr=1e-2), loader(counting_batches(3)))
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"] is True
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)

    def norm():
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()

    assert norm() > 1
    plugin.clip_gradients(optimizer, clip_val=0.05)
    assert norm() == pytest.approx(0.05, rel=1e-4)


def _swapped(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()} & {"ReuseLinear4bit", "ReplayDropout", "LoRALinear4bit"}


def test_deprecated_cpu_reuse_recompute_warns_and_runs_stock_layers():
    with pytest.warns(DeprecationWarning, match=r"pass QLoRAPlugin\(cpu=CPUOptions\(reuse_recompute=False\)\) instead"):
        plugin = QLoRAPlugin(cpu_reuse_recompute=False)
    assert plugin.cpu_options == CPUOptions(reuse_recompute=False)
    model, _ = _fit_dropout_llama(1, plugin=plugin)
    assert not _swapped(model)  # stock bitsandbytes and PEFT layers


def test_deprecated_cpu_fast_dropout_warns_and_draws_torch_masks():
    with pytest.warns(DeprecationWarning, match=r"QLoRAPlugin\(cpu_fast_dropout=\.\.\.\) is deprecated"):
        plugin = QLoRAPlugin(cpu_fast_dropout=False)
    model, _ = _fit_dropout_llama(1, plugin=plugin)
    drops = [m for m in model.modules() if type(m).__name__ == "ReplayDropout"]
    assert len(drops) == 14 and not any(d.fast_masks for d in drops)


def test_deprecated_cpu_mmap_threshold_sets_the_option():
    # Not fitted: pinning the threshold is process-wide (tests/cpu/test_allocator.py runs it in a subprocess).
    with pytest.warns(DeprecationWarning, match=r"pass QLoRAPlugin\(cpu=CPUOptions\(mmap_threshold=65536\)\) instead"):
        plugin = QLoRAPlugin(cpu_mmap_threshold=65536)
    assert plugin.cpu_options == CPUOptions(mmap_threshold=65536)


def test_cpu_alias_and_cpu_options_together_are_refused():
    with pytest.raises(ValueError, match=r"^QLoRAPlugin\(\) got both cpu= and the deprecated cpu_fast_dropout=False;"):
        QLoRAPlugin(cpu=CPUOptions(), cpu_fast_dropout=False)
    with pytest.raises(TypeError, match=r"QLoRAPlugin\(\) got an unexpected keyword argument 'cpu_reuse'"):
        QLoRAPlugin(cpu_reuse=False)
