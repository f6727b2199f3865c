import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lightning_qlora.core.quantize import QuantConfig, _make_quantized
from lightning_qlora.core.quantize4bit import _probe, quantize_4bit


def _stock(weight, blocksize=64, quant_type="nf4", double_quant=True, storage=torch.uint8):
    return bnb.functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage
    )


def _assert_same(ours, stock):
    (data, state), (data_ref, state_ref) = ours, stock
    # As bytes: 4-bit pairs stored as floats may read as NaN.
    assert data.dtype == data_ref.dtype and torch.equal(data.view(torch.uint8), data_ref.view(torch.uint8))
    assert torch.equal(state.absmax, state_ref.absmax) and torch.equal(state.code, state_ref.code)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (
        state_ref.shape,
        state_ref.dtype,
        state_ref.blocksize,
        state_ref.quant_type,
    )
    assert (state.state2 is None) == (state_ref.state2 is None)
    if state.state2 is not None:
        assert torch.equal(state.offset, state_ref.offset)
        assert torch.equal(state.state2.absmax, state_ref.state2.absmax)
    # And the weights it computes with.
    torch.testing.assert_close(
        bnb.functional.dequantize_4bit(data, state), bnb.functional.dequantize_4bit(data_ref, state_ref), rtol=0, atol=0
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "shape",
    [(192, 64), (577, 3), (7,), (1, 1), (100, 129), (4096 + 65, 16)],
    ids=["blocks", "partial-block", "odd", "one", "odd-rows", "many-pieces"],
)
def test_same_bytes_as_bitsandbytes(quant_type, double_quant, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    _assert_same(quantize_4bit(weight, 64, quant_type, double_quant), _stock(weight, 64, quant_type, double_quant))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_give_bitsandbytes_bytes(dtype):
    weight = torch.randn(130, 70).to(dtype)
    _assert_same(quantize_4bit(weight), _stock(weight))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_bounds_zeros_and_storages_match(blocksize, storage):
    # Every bound of both codes, its neighbours, signed zeros and an all-zero block.
    weight = _probe(blocksize, storage)
    _assert_same(
        quantize_4bit(weight, blocksize, "fp4", True, storage), _stock(weight, blocksize, "fp4", True, storage)
    )
    _assert_same(
        quantize_4bit(weight, blocksize, "nf4", True, storage), _stock(weight, blocksize, "nf4", True, storage)
    )


def test_where_it_does_not_apply_bitsandbytes_quantizes():
    weight = torch.randn(64, 64)
    weight[3, 5] = float("nan")
    assert quantize_4bit(weight) is None  # non-finite: bitsandbytes' own handling
    assert quantize_4bit(torch.randn(64, 64), blocksize=48) is None  # a block size bitsandbytes refuses
    assert quantize_4bit(torch.ones(64, 64, dtype=torch.int32)) is None
    assert quantize_4bit(torch.randn(64, 64), quant_type="int8") is None


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_layer_quantized_here_equals_params4bit(quant_type):
    linear = nn.Linear(96, 80, bias=True)
    config = QuantConfig(quant_type=quant_type)
    ours = _make_quantized(bnb, linear, config, torch.float32, torch.device("cpu"))
    x = torch.randn(5, 96)
    # bitsandbytes' own path: a Params4bit moved to the CPU.
    stock = bnb.nn.Linear4bit(96, 80, bias=True, compute_dtype=torch.float32, quant_type=quant_type)
    stock.load_state_dict(linear.state_dict())
    stock = stock.to("cpu")
    assert ours.weight.bnb_quantized and ours.quant_state is ours.weight.quant_state
    assert torch.equal(ours.weight.data, stock.weight.data)
    torch.testing.assert_close(ours(x), stock(x), rtol=0, atol=0)


def test_nan_weights_still_quantize_through_bitsandbytes():
    linear = nn.Linear(64, 64)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    layer = _make_quantized(bnb, linear, QuantConfig(), torch.float32, torch.device("cpu"))
    assert layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8


def test_zero_blocks_and_a_zero_partial_block_match():
    weight = torch.zeros(64 * 3 + 10)
    weight[70] = 0.25  # one block with a value, the others all zero
    _assert_same(quantize_4bit(weight), _stock(weight))
