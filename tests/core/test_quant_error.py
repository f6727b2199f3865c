import copy

import bitsandbytes as bnb
import pytest
import torch

from lightning_qlora.core.quant_error import (
    LayerError,
    measure_quant_error,
    roundtrip,
    summarize,
    write_error_report,
)
from lightning_qlora.core.quantize import QuantConfig, quantize_model
from tests.conftest import SEQ, VOCAB


def _calibration(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(0))


def test_measures_exactly_the_layers_quantize_model_replaces(tiny_llama):
    errors = measure_quant_error(tiny_llama)
    report = quantize_model(copy.deepcopy(tiny_llama))
    assert [e.name for e in errors] == report.quantized  # 2 layers x 7, lm_head kept
    assert errors[0] == LayerError("model.layers.0.self_attn.q_proj", (64, 64), 4096, errors[0].weight_rel_error)
    skipped = measure_quant_error(tiny_llama, QuantConfig(skip_modules=("model.layers.0",)))
    assert [e.name for e in skipped] == report.quantized[7:]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_roundtrip_is_what_the_4bit_layer_computes_with(tiny_llama, quant_type):
    weight = tiny_llama.model.layers[0].mlp.down_proj.weight.detach().clone()
    quantize_model(tiny_llama, QuantConfig(quant_type))
    layer = tiny_llama.model.layers[0].mlp.down_proj
    used = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(roundtrip(weight, QuantConfig(quant_type)), used, rtol=0, atol=0)


def test_roundtrip_is_what_the_int8_layer_computes_with(tiny_llama):
    weight = tiny_llama.model.layers[0].mlp.down_proj.weight.detach().clone()
    quantize_model(tiny_llama, QuantConfig("int8"))
    param = tiny_llama.model.layers[0].mlp.down_proj.weight
    used = param.CB.float() * param.SCB.float()[:, None] / 127
    torch.testing.assert_close(roundtrip(weight, QuantConfig("int8")), used)


def test_errors_on_a_fixed_gaussian_weight_are_pinned():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def rel(config: QuantConfig) -> float:
        return float((w - roundtrip(w, config)).norm() / w.norm())

    # NF4 is optimal for normal weights: ~9.2% relative error; FP4 ~12.2%; row-wise int8 ~0.7%.
    assert rel(QuantConfig("nf4")) == pytest.approx(0.09204, abs=5e-4)
    assert rel(QuantConfig("nf4", double_quant=False)) == pytest.approx(0.09201, abs=5e-4)
    assert rel(QuantConfig("fp4")) == pytest.approx(0.12204, abs=5e-4)
    assert rel(QuantConfig("int8")) == pytest.approx(0.00695, abs=2e-4)


def test_int8_loses_less_than_nf4_on_every_layer(tiny_llama):
    nf4 = measure_quant_error(tiny_llama, QuantConfig("nf4"))
    int8 = measure_quant_error(tiny_llama, QuantConfig("int8"))
    assert all(i.weight_rel_error < n.weight_rel_error / 5 for i, n in zip(int8, nf4, strict=True))
    assert all(0.08 < n.weight_rel_error < 0.11 for n in nf4)


def test_output_error_needs_calibration_and_leaves_the_model_as_it_was(tiny_llama):
    tiny_llama.train()
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    plain = measure_quant_error(tiny_llama)
    assert all(e.output_rel_error is None for e in plain)
    calibrated = measure_quant_error(tiny_llama, calibration=_calibration())
    assert all(isinstance(e.output_rel_error, float) for e in calibrated)
    # Same weight errors; on real inputs the output error is of the same size as the weight error.
    assert [e.weight_rel_error for e in calibrated] == [e.weight_rel_error for e in plain]
    assert all(0.5 < e.output_rel_error / e.weight_rel_error < 2 for e in calibrated)
    assert tiny_llama.training
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in tiny_llama.modules())


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (torch.arange(SEQ), r"shape \(16,\) and dtype torch.int64"),
        (torch.rand(2, SEQ), r"shape \(2, 16\) and dtype torch.float32"),
        (torch.full((2, SEQ), VOCAB), r"outside the model's vocabulary \[0, 64\)"),
        (torch.zeros(2, 0, dtype=torch.long), "holds no tokens"),
        ([[1, 2, 3]], "not a tensor"),
    ],
)
def test_bad_calibration_raises(tiny_llama, calibration, match):
    with pytest.raises(ValueError, match=match):
        measure_quant_error(tiny_llama, calibration=calibration)


def test_an_already_quantized_model_is_refused(tiny_llama):
    quantize_model(tiny_llama)
    with pytest.raises(ValueError, match="already a bitsandbytes Linear4bit.*before quantize_model"):
        measure_quant_error(tiny_llama)


def test_report_has_one_row_per_layer_and_a_chart(tiny_llama, tmp_path):
    errors = measure_quant_error(tiny_llama, calibration=_calibration())
    csv_path, png_path = write_error_report(errors, tmp_path / "report")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "name,out_features,in_features,numel,weight_rel_error,output_rel_error"
    assert len(lines) == 1 + 14
    assert lines[1].startswith("model.layers.0.self_attn.q_proj,64,64,4096,")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    worst = max(errors, key=lambda e: e.weight_rel_error)
    mean = sum(e.weight_rel_error for e in errors) / len(errors)
    line = summarize(errors)
    assert "\n" not in line
    assert line.startswith(f"14 layers: mean relative weight error {mean:.4f}, worst {worst.name}")
    assert "mean output error" in line
    with pytest.raises(ValueError, match="errors is empty"):
        summarize([])


def test_plugin_records_the_same_errors_as_measuring_beforehand(tiny_llama):
    from lightning_qlora.core.quant_error import measure_quant_error
    from lightning_qlora.lightning.plugin import QLoRAPlugin

    before = measure_quant_error(copy.deepcopy(tiny_llama))
    plugin = QLoRAPlugin()
    plugin.convert_module(tiny_llama)
    recorded = plugin.quant_errors["LlamaForCausalLM"]
    assert [e.name for e in recorded] == [e.name for e in before] and len(recorded) == 14
    for a, b in zip(recorded, before, strict=True):
        assert a.weight_rel_error == pytest.approx(b.weight_rel_error, rel=1e-5)
