import pytest
import torch

from lightning_qlora import CausalLMModule
from lightning_qlora.metrics import shifted_token_stats
from lightning_qlora.optim import warmup_cosine
from tests.conftest import counting_batches


def test_answer_only_logits_give_the_same_loss_as_full_logits(tiny_llama):
    module = CausalLMModule(tiny_llama)
    batch = counting_batches(1, batch_size=3)[0]
    batch["labels"][:, :9] = -100  # a masked "prompt"
    batch["labels"][1, :12] = -100
    with torch.no_grad():
        fast = module._stats(batch)
        full = shifted_token_stats(tiny_llama(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert module._keeps_logits
    torch.testing.assert_close(fast[0], full[0], rtol=1e-5, atol=1e-4)
    assert fast[1] == full[1] and fast[2] == full[2] == 7 + 4 + 7  # labels 9-15, 12-15, 9-15


def test_schedule_warms_up_then_decays_to_the_floor():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0}, "lr should be positive"),
        ({"optimizer": "sgd"}, "optimizer='sgd' is unknown"),
        ({"warmup_steps": -1}, "warmup_steps should be >= 0"),
        ({"min_lr_ratio": 2}, r"min_lr_ratio should be in \[0, 1\]"),
    ],
)
def test_bad_optimizer_arguments(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalLMModule(tiny_llama, **kwargs)
