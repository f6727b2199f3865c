import pytest
import torch

from lightning_qlora.tasks.optim import build_optimizer


def _adapter_like_params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 64), (64, 16), (16, 64), (32, 16)]
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_cpu_adamw_is_fused_and_steps_like_the_plain_loop(weight_decay):
    ours = _adapter_like_params(0)
    optimizer = build_optimizer(ours, "adamw", lr=1e-2, weight_decay=weight_decay, device=torch.device("cpu"))
    assert optimizer.defaults["fused"] is True

    plain = _adapter_like_params(0)
    reference = torch.optim.AdamW(plain, lr=1e-2, weight_decay=weight_decay, foreach=False)
    _train(optimizer, ours, steps=20)
    _train(reference, plain, steps=20)
    for a, b, start in zip(ours, plain, _adapter_like_params(0), strict=True):
        assert (a - start).abs().max() > 0.05  # 20 steps of lr 1e-2 moved it
        # The fused kernel rounds differently in the last bit, nothing more.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_no_trainable_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], "adamw", lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
