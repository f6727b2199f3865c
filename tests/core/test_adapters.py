import pytest
import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

from lightning_qlora.core.adapters import AdapterConfig, add_adapters, count_parameters
from lightning_qlora.core.quantize import quantize_model
from tests.conftest import counting_batches, tiny_llama_config


def test_only_adapters_train_and_counts_are_pinned(tiny_llama):
    quantize_model(tiny_llama)
    _, report = add_adapters(tiny_llama, AdapterConfig(r=8, alpha=16))
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 28  # 14 layers x (A, B)
    # Per layer r * (in + out): q 8*128, k 8*96, v 8*96, o 8*128, gate/up 8*192, down 8*192 = 8,192.
    assert report.trainable == 2 * 8_192
    # 73,728 quantized weights (logical count) + embedding 4,096 + head 4,096 + 5 norms x 64 + adapters.
    assert report.total == 73_728 + 4_096 + 4_096 + 5 * 64 + 16_384
    assert count_parameters(tiny_llama) == (report.trainable, report.total)


def test_peft_dispatches_its_bnb_aware_layer(tiny_llama):
    quantize_model(tiny_llama)
    add_adapters(tiny_llama)
    # The bnb-aware class dequantizes on merge; the generic one would add to packed bytes.
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, LoraLinear4bit)


def _lora_b_grads(checkpointing: bool | int, layers: int = 2, offload: bool = False) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=layers))
    quantize_model(model)
    torch.manual_seed(1)  # the same LoRA A init on both sides
    add_adapters(model, AdapterConfig(gradient_checkpointing=checkpointing, dropout=0.0, offload_activations=offload))
    flag = getattr(model, "is_activation_checkpointing", None)
    assert (flag if flag is not None else model.is_gradient_checkpointing) == bool(checkpointing)
    model.train()
    batch = counting_batches(1)[0]
    model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}


def test_gradient_checkpointing_with_frozen_base_gives_adapter_grads():
    # The recompute gives every adapter the gradient a plain backward gives (B starts at 0, so only
    # B has one at the first step); a checkpoint that lost the graph would leave them None or zero.
    recomputed, plain = _lora_b_grads(True), _lora_b_grads(False)
    assert recomputed.keys() == plain.keys() and len(plain) == 14
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_every_kth_layer_checkpointing_gives_the_plain_gradients_and_recomputes_only_those_layers():
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lightning_qlora.core.adapters import checkpoint_every

    plain, every = _lora_b_grads(False, layers=5), _lora_b_grads(2, layers=5)
    assert every.keys() == plain.keys() and len(plain) == 35
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(every[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=5))
    add_adapters(model, AdapterConfig(gradient_checkpointing=2))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False, True]
    calls = []
    for index, layer in enumerate(layers):  # transformers checkpoints forward, not the layer's hooks
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=index: calls.append(i))
    model.train()
    batch = counting_batches(1)[0]
    model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
    # Five forwards, then the backward recomputes layers 4, 2 and 0 only.
    assert calls == [0, 1, 2, 3, 4, 4, 2, 0]
    assert [checkpoint_every(v) for v in (False, True, 1, 3)] == [0, 1, 1, 3]


def test_offloaded_activations_give_the_same_gradients(caplog):
    # On a CPU the offload is a host-to-host copy: the same code path as on a GPU, minus the device.
    # Every saved tensor of each checkpointed layer goes through the pack and unpack hooks.
    packed = []
    real = torch.autograd.graph.save_on_cpu.__init__

    def counting(self, *args, **kwargs):
        real(self, *args, **kwargs)
        pack = self.pack_hook
        self.pack_hook = lambda t: packed.append(t.shape) or pack(t)

    plain = _lora_b_grads(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.autograd.graph.save_on_cpu, "__init__", counting)
        offloaded = _lora_b_grads(True, offload=True)
    assert len(packed) >= 2 and "already in host memory" in caplog.text
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(offloaded[name], grad, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="offload_activations=True needs gradient_checkpointing"):
        AdapterConfig(gradient_checkpointing=False, offload_activations=True)


def test_norms_are_kept_in_fp32(tiny_llama):
    tiny_llama.to(torch.bfloat16)
    quantize_model(tiny_llama)
    add_adapters(tiny_llama)
    assert tiny_llama.model.norm.weight.dtype == torch.float32
    assert tiny_llama.model.layers[0].input_layernorm.weight.dtype == torch.float32


def test_target_list_and_regex(tiny_llama):
    quantize_model(tiny_llama)
    _, report = add_adapters(tiny_llama, AdapterConfig(target_modules=["q_proj", "v_proj"]))
    assert sorted(report.layers) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    )


def test_regex_targets_full_names():
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config())
    _, report = add_adapters(model, AdapterConfig(target_modules=r"model\.layers\.1\.mlp\..*"))
    assert sorted(report.layers) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_classification_head_trains_fully():
    from transformers import LlamaForSequenceClassification

    from tests.conftest import tiny_llama_config

    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=3))
    report = quantize_model(model)
    assert "score" in report.skipped
    add_adapters(model, AdapterConfig(modules_to_save=("score",)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n and "lora" not in n for n in trainable)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r should be a positive integer, but got r=0"),
        ({"r": 2.5}, "r should be a positive integer"),
        ({"alpha": -1}, "alpha should be a positive number"),
        ({"dropout": 1.0}, r"dropout should be in \[0, 1\)"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"gradient_checkpointing": 0}, "gradient_checkpointing should be true, false or k"),
        ({"gradient_checkpointing": "2"}, "gradient_checkpointing should be true, false or k"),
    ],
)
def test_bad_adapter_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_targets_that_match_nothing_name_the_available_layers(tiny_llama):
    quantize_model(tiny_llama)
    with pytest.raises(ValueError, match=r"'qproj' matches no Linear layer.*available: down_proj, gate_proj, k_proj"):
        add_adapters(tiny_llama, AdapterConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match="matches no Linear layer"):
        add_adapters(tiny_llama, AdapterConfig(target_modules=r"attention\..*"))


def test_adding_adapters_twice_is_refused(tiny_llama):
    add_adapters(tiny_llama)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_adapters(tiny_llama)


def test_modules_to_save_that_match_nothing_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="modules_to_save entry 'scroe' matches no module"):
        add_adapters(tiny_llama, AdapterConfig(modules_to_save=("scroe",)))


def _plugin_fit(model, steps, **adapter_kwargs):
    from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
    from tests.conftest import LossRecorder, counting_batches, loader, quiet_trainer

    recorder = LossRecorder()
    adapters = LoRAAdapters(r=4, alpha=8, dropout=0.0, gradient_checkpointing=False, **adapter_kwargs)
    trainer = quiet_trainer(plugins=[QLoRAPlugin()], callbacks=[adapters, recorder], max_steps=steps)
    trainer.fit(CausalLMModule(model, lr=1e-2, warmup_steps=0), loader(counting_batches(steps)))
    return trainer, recorder.losses


def test_dora_trains_on_the_4bit_base_and_exports_its_magnitudes(tiny_llama, tmp_path):
    trainer, losses = _plugin_fit(tiny_llama, 20, use_dora=True)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert "default" in layer.lora_magnitude_vector
    assert losses[-1] < 0.8 * losses[0]
    peft_model = trainer.precision_plugin.peft_models["model"]
    peft_model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert sum("lora_magnitude_vector" in k for k in f.keys()) == 14  # noqa: SIM118


def test_rslora_scales_by_the_square_root_of_r(tiny_llama):
    from lightning_qlora import add_adapters

    add_adapters(tiny_llama, AdapterConfig(r=16, alpha=8, use_rslora=True))
    assert tiny_llama.model.layers[0].mlp.up_proj.scaling["default"] == pytest.approx(8 / 4)


def test_loftq_starts_closer_to_the_full_precision_model():
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    from lightning_qlora.lightning.plugin import QLoRAPlugin

    ids = counting_batches(1, seed=5)[0]["input_ids"]
    logits, models = {}, {}
    for init in ("fp", "default", "loftq"):
        torch.manual_seed(0)
        model = models[init] = LlamaForCausalLM(tiny_llama_config())
        if init != "fp":
            plugin = QLoRAPlugin(adapters=AdapterConfig(r=8, alpha=16, gradient_checkpointing=False, init=init))
            plugin.convert_module(model)
        with torch.no_grad():
            logits[init] = model.eval()(input_ids=ids).logits
    err = {k: float((logits[k] - logits["fp"]).norm() / logits["fp"].norm()) for k in ("default", "loftq")}
    # Random weights have a flat residual spectrum, so rank 8 of 64 removes only part of
    # the error (0.51 -> 0.43 here); trained weights are less flat.
    assert err["loftq"] < 0.9 * err["default"], err
    # Per layer, the adapted weight is as close to W as any rank-8 fix can be (Eckart-Young).
    w = models["fp"].model.layers[0].mlp.down_proj.weight
    layer = models["loftq"].model.layers[0].mlp.down_proj
    packed = layer.base_layer.weight
    dense = bnb.functional.dequantize_4bit(packed.data, packed.quant_state)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    tail = torch.linalg.svdvals(w - dense)[8:].norm()
    assert float((w - dense - delta).norm()) == pytest.approx(float(tail), rel=0.02)


def test_variant_arguments_are_checked():
    with pytest.raises(ValueError, match="init='pissa' is unknown; use one of: default, loftq"):
        AdapterConfig(init="pissa")
    with pytest.raises(ValueError, match="loftq' with use_dora=True is not supported"):
        AdapterConfig(init="loftq", use_dora=True)


def test_a_loaded_adapter_trains_on_with_offloaded_activations(tmp_path, caplog):
    from transformers import LlamaForCausalLM

    from lightning_qlora.core.adapters import load_adapters

    def base():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
        quantize_model(model)
        return model

    saved, _ = add_adapters(base(), AdapterConfig(r=8))
    saved.save_pretrained(tmp_path)
    model = base()
    load_adapters(model, str(tmp_path), trainable=True, gradient_checkpointing=True, offload_activations=True)
    funcs = [m._gradient_checkpointing_func for m in model.model.layers]
    assert all(f.__name__ == "offloaded" for f in funcs) and "already in host memory" in caplog.text
    with pytest.raises(ValueError, match="offload_activations=True needs gradient_checkpointing"):
        load_adapters(base(), str(tmp_path), trainable=True, gradient_checkpointing=False, offload_activations=True)
    # For inference nothing checkpoints, so nothing offloads.
    frozen = base()
    load_adapters(frozen, str(tmp_path), offload_activations=True)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in frozen.model.layers)
