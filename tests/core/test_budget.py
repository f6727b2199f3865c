"""The precision budget: which layers go to int8, what it costs, and what it buys."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lightning_qlora.core.budget import plan_budget
from lightning_qlora.core.quantize import QuantConfig, quantized_linear_bytes
from lightning_qlora.lightning.plugin import QLoRAPlugin
from tests.conftest import counting_batches, tiny_llama_config


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def test_plan_stays_within_the_allowance_and_promotes_the_best_value_first():
    plan = plan_budget(_model(), QuantConfig(), 0.2)
    # 4-bit base: 14 layers, 53,360 bytes as pinned in test_quantize.
    assert plan.base_bytes == sum(
        quantized_linear_bytes(o, i, "nf4", True)
        for o, i in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    )
    assert 0 < plan.extra_bytes <= plan.allowance_bytes == int(0.2 * plan.base_bytes)
    assert plan.promoted  # some layers fit
    bigger = plan_budget(_model(), QuantConfig(), 1.0)
    assert set(plan.promoted) <= set(bigger.promoted) and len(bigger.promoted) > len(plan.promoted)


def test_promoted_layers_are_int8_and_the_model_is_closer_to_fp32():
    ids = counting_batches(1, seed=4)[0]["input_ids"]
    logits = {}
    for budget in (None, 1.0):
        model = _model()
        plugin = QLoRAPlugin(keep_high_precision=budget)
        if budget is None:
            with torch.no_grad():
                logits["fp"] = model.eval()(input_ids=ids).logits
        plugin.convert_module(model)
        with torch.no_grad():
            logits[budget] = model.eval()(input_ids=ids).logits
        if budget:
            promoted = plugin.budget_plans["LlamaForCausalLM"].promoted
            layer = model.get_submodule(promoted[0])
            assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt)  # PEFT wrapped the int8 layer too
    err = {k: float((logits[k] - logits["fp"]).norm() / logits["fp"].norm()) for k in (None, 1.0)}
    assert err[1.0] < 0.7 * err[None], err


def test_a_budget_that_cannot_be_met():
    with pytest.raises(ValueError, match=r"keep_high_precision=1e-06 allows 0.000 MiB, .* raise it to at least"):
        plan_budget(_model(), QuantConfig(), 1e-6)
    with pytest.raises(ValueError, match="should be a positive fraction"):
        QLoRAPlugin(keep_high_precision=-0.1)
    with pytest.raises(ValueError, match="needs quant_type nf4 or fp4"):
        plan_budget(_model(), QuantConfig("int8"), 0.05)
