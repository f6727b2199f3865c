import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lightning_qlora.core.quantize import QuantConfig, quantize_model, quantized_nbytes


def test_every_body_linear_becomes_4bit_and_heads_stay(tiny_llama):
    report = quantize_model(tiny_llama)
    linears = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    body = {n: m for n, m in linears.items() if n != "lm_head"}
    assert len(body) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in body.values())
    assert type(tiny_llama.lm_head) is nn.Linear
    assert sorted(report.quantized) == sorted(body)
    assert report.skipped == ["lm_head"]
    assert report.compute_dtype == torch.float32  # "auto" on CPU
    w = tiny_llama.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4" and w.quant_state.nested


def test_weight_bytes_are_pinned(tiny_llama):
    report = quantize_model(tiny_llama)
    # 73,728 fp32 weights = 294,912 bytes. After: 36,864 packed (two per byte)
    # + 1,152 uint8 block scales (one per 64 weights) + 14 x 64 B NF4 code books
    # + double quantization's 14 x (4 B scale + 1,024 B code + 4 B offset) = 53,360.
    assert report.bytes_before == 294_912
    assert report.bytes_after == 53_360
    assert report.bytes_after == sum(quantized_nbytes(tiny_llama.get_submodule(n)) for n in report.quantized)


def test_forward_matches_dequantized_weights(tiny_llama):
    layer = tiny_llama.model.layers[0].mlp.down_proj
    original = layer.weight.detach().clone()
    quantize_model(tiny_llama)
    q = tiny_llama.model.layers[0].mlp.down_proj
    dequant = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    x = torch.randn(3, 128)
    torch.testing.assert_close(q(x), x @ dequant.T, rtol=1e-5, atol=1e-5)
    # NF4 of Gaussian-like weights: a few percent relative error, never exact, never wild.
    err = ((dequant - original).norm() / original.norm()).item()
    assert 0.02 < err < 0.15


def test_quantizing_twice_is_a_no_op(tiny_llama):
    quantize_model(tiny_llama)
    packed = tiny_llama.model.layers[0].self_attn.q_proj.weight.data.clone()
    again = quantize_model(tiny_llama)
    assert again.quantized == [] and len(again.already_quantized) == 14
    assert torch.equal(tiny_llama.model.layers[0].self_attn.q_proj.weight.data, packed)


def test_int8_and_fp4(tiny_llama):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    quantize_model(tiny_llama, QuantConfig(quant_type="int8"))
    assert isinstance(tiny_llama.model.layers[1].mlp.gate_proj, bnb.nn.Linear8bitLt)
    assert tiny_llama.model.layers[1].mlp.gate_proj.weight.dtype == torch.int8
    other = LlamaForCausalLM(tiny_llama_config())
    quantize_model(other, QuantConfig(quant_type="fp4", double_quant=False))
    state = other.model.layers[0].self_attn.q_proj.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested


def test_skip_modules_keeps_named_layers(tiny_llama):
    report = quantize_model(tiny_llama, QuantConfig(skip_modules=("model.layers.1",)))
    assert len(report.quantized) == 7
    assert type(tiny_llama.model.layers[1].self_attn.q_proj) is nn.Linear


def test_model_without_linear_layers_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2's projections are transformers Conv1D, not nn.Linear; its only Linear is the head.
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(TypeError, match="no nn.Linear layer to quantize"):
        quantize_model(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant_type": "nf3"}, "quant_type='nf3' is unknown; use one of: nf4, fp4, int8"),
        ({"quant_type": "int8", "compute_dtype": "bf16"}, "does not support compute_dtype=bf16"),
        ({"compute_dtype": "fp8"}, "compute_dtype='fp8' is not supported"),
        ({"quant_storage": "int4"}, "quant_storage='int4' is not supported"),
    ],
)
def test_bad_quant_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantConfig(**kwargs)


def test_meta_weights_are_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="meta device"):
        quantize_model(model, device="cpu")


def test_already_quantized_integer_weights_are_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="cannot be quantized again"):
        quantize_model(model)


def test_skip_modules_that_match_nothing_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="skip_modules entry 'lm_haed' matches no module"):
        quantize_model(tiny_llama, QuantConfig(skip_modules=("lm_haed",)))


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_compute_dtype_is_fp16_where_bf16_is_only_emulated(monkeypatch, capability, expected):
    # V100 (7.0) and T4 (7.5) emulate bf16, several times slower than fp16 with a grad scaler;
    # torch.cuda.is_bf16_supported() says yes to them by default.
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"major": capability[0]})
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)  # emulated
    assert QuantConfig().resolve_compute_dtype("cuda") == expected
    assert QuantConfig(quant_type="int8").resolve_compute_dtype("cuda") == torch.float16
    assert QuantConfig().resolve_compute_dtype("cpu") == torch.float32
