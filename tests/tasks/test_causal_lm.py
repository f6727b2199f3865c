import pytest
import torch

from lightning_qlora import CausalLMModule
from lightning_qlora.tasks.metrics import shifted_token_stats
from lightning_qlora.tasks.optim import warmup_cosine
from tests.conftest import counting_batches


def test_answer_only_logits_give_the_same_loss_as_full_logits(tiny_llama):
    module = CausalLMModule(tiny_llama)
    batch = counting_batches(1, batch_size=3)[0]
    batch["labels"][:, :9] = -100  # a masked "prompt"
    batch["labels"][1, :12] = -100
    with torch.no_grad():
        fast = module._stats(batch)
        train = module._loss_sums(batch)  # the training step's sums, without the accuracy pass
        full = shifted_token_stats(tiny_llama(input_ids=batch["input_ids"]).logits, batch["labels"])
    # Training sums through the chunked loss (the default), one chunk here: cross_entropy's own kernels.
    assert torch.equal(train[0], fast[0]) and train[1] == fast[2]
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


def test_packed_batch_gives_the_same_loss_as_separate_rows(tiny_llama):
    from lightning_qlora.tasks.data import collate
    from lightning_qlora.tasks.data.formatting import Encoded, pack

    module = CausalLMModule(tiny_llama).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in ((9, 3), (6, 2), (12, 5)):
        ids = torch.randint(0, 64, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [-100] * prompt + ids[prompt:], False))
    packed = collate(pack(examples, max_length=64), pad_id=0)
    separate = collate(examples, pad_id=0)
    with torch.no_grad():
        nll_packed, _, n_packed = module._stats(packed)
        nll_separate, _, n_separate = module._stats(separate)
    assert packed["input_ids"].shape == (1, 27)
    assert n_packed == n_separate == 6 + 4 + 7
    torch.testing.assert_close(nll_packed, nll_separate, rtol=1e-4, atol=1e-4)


def test_validate_before_fit_then_validation_inside_fit(tiny_llama):
    # trainer.validate runs under inference mode; the metric states it leaves behind must
    # still accept updates during the validation that fit runs at the end of an epoch.
    from lightning_qlora import QLoRAPlugin
    from tests.conftest import loader, quiet_trainer

    module = CausalLMModule(tiny_llama)
    trainer = quiet_trainer(plugins=[QLoRAPlugin()], max_epochs=1)
    val = loader(counting_batches(2, seed=5))
    before = trainer.validate(module, val, verbose=False)[0]["val_loss"]
    trainer.fit(module, loader(counting_batches(3)), val)
    during = float(trainer.callback_metrics["val_loss"])
    # The in-fit validation scored the trained model: its mean next-token NLL, recomputed here
    # from plain forwards (every token is a label in counting_batches).
    module.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in counting_batches(2, seed=5):
            logits = tiny_llama(input_ids=batch["input_ids"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            tokens += targets.numel()
    assert during == pytest.approx(nll / tokens, abs=1e-4)
    assert during < before - 0.01  # 3 steps on the counting task lowered it (6.852 -> 6.825)


def test_option_scores_match_scoring_each_option_from_scratch(tiny_llama):
    from lightning_qlora.tasks.causal_lm import option_scores

    tiny_llama.eval()
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    options = [[5, 6, 7], [9], [10, 11]]
    with torch.no_grad():
        cached = option_scores(tiny_llama, prompt, options)
        expected = []
        for option in options:
            logp = tiny_llama(torch.cat([prompt, torch.tensor([option])], 1)).logits[0].log_softmax(-1)
            expected.append(sum(logp[6 + j, t] for j, t in enumerate(option)) / len(option))
    torch.testing.assert_close(cached, torch.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompted", [True, False], ids=["answer-only", "every-token"])
def test_padding_free_batch_trains_like_the_padded_one(prompted):
    """One row, no padding, no mask tensor: the padded batch's loss and LoRA gradients (sdpa)."""
    from transformers import LlamaForCausalLM

    from lightning_qlora.core.adapters import AdapterConfig, add_adapters
    from lightning_qlora.tasks.data import collate
    from lightning_qlora.tasks.data.datamodule import collate_padding_free
    from lightning_qlora.tasks.data.formatting import Encoded
    from tests.conftest import tiny_llama_config

    g = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in ((9, 3), (6, 2), (12, 5)):
        ids = torch.randint(0, 64, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [-100] * (prompt if prompted else 0) + ids[prompt if prompted else 0 :], False))
    results = {}
    for name, batch in (("padded", collate(examples, pad_id=0)), ("free", collate_padding_free(examples))):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
        assert model.config._attn_implementation == "sdpa"
        add_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(pname)))
        nll, count = CausalLMModule(model)._loss_sums(batch)
        (nll / count).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (nll.detach(), int(count), grads, batch)
    (nll_p, n_p, g_p, padded), (nll_f, n_f, g_f, free) = results["padded"], results["free"]
    assert free["input_ids"].shape == (1, 27) and padded["input_ids"].shape == (3, 12)
    assert "attention_mask" not in free and free["position_ids"][0].tolist()[9:15] == list(range(6))
    # Every token after each example's first is scored, or the answers only; never across examples.
    assert n_f == n_p == ((6 + 4 + 7) if prompted else (8 + 5 + 11))
    torch.testing.assert_close(nll_f, nll_p, rtol=1e-5, atol=1e-4)
    for name in g_p:
        assert g_p[name].abs().sum() > 0, name
        assert (g_f[name] - g_p[name]).abs().max() <= 1e-4 * g_p[name].abs().max(), name


def test_an_unknown_packing_value_is_refused():
    from lightning_qlora.tasks.data.datamodule import PromptAnswerDataModule

    with pytest.raises(ValueError, match="packing='yes': expected true, false or padding_free"):
        PromptAnswerDataModule(None, {"train": [{}], "validation": [{}]}, to_pair=lambda r: ("", ""), packing="yes")
