"""Adapter-only checkpoints, exact resume, and the checks that refuse a wrong checkpoint."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.lightning.checkpoint import META_KEY, AtomicCheckpointIO, _umask, read_checkpoint
from lightning_qlora.tasks.data import PromptAnswerDataModule
from tests.conftest import LossRecorder, quiet_trainer, tiny_llama_config
from tests.tasks.data.test_formatting import CharTokenizer

ROWS = [{"p": f"add {a} and {b}", "a": str(a + b)} for a in range(5) for b in range(5)]  # 25 rows


def _module(seed: int = 0) -> CausalLMModule:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=256, max_position_embeddings=128))
    return CausalLMModule(model, lr=5e-3, warmup_steps=2)


def _data() -> PromptAnswerDataModule:
    splits = {"train": ROWS[:20], "validation": ROWS[20:]}
    return PromptAnswerDataModule(CharTokenizer(), splits, lambda r: (r["p"], r["a"]), max_length=32, batch_size=4)


def _fit(tmp_path, max_steps, ckpt_path=None, r=4, seed=0):
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer = quiet_trainer(
        max_steps=max_steps,
        plugins=[QLoRAPlugin(), AtomicCheckpointIO()],
        # dropout > 0: the resumed run must draw the same dropout masks as the uninterrupted one.
        callbacks=[LoRAAdapters(r=r, alpha=8, dropout=0.1, gradient_checkpointing=False), checkpoints, recorder],
        enable_checkpointing=True,
        limit_val_batches=0,
    )
    trainer.fit(_module(seed), _data(), ckpt_path=ckpt_path, weights_only=True)
    return recorder.losses, tmp_path / "ckpt"


def test_resume_continues_the_same_loss_curve(tmp_path):
    # 20 rows / batch 4 = 5 batches per epoch: step 3's checkpoint is mid-epoch, and the
    # resumed run crosses an epoch boundary at step 5.
    full, ckpt_dir = _fit(tmp_path / "a", max_steps=8)
    assert len(full) == 8
    resumed, _ = _fit(tmp_path / "b", max_steps=8, ckpt_path=ckpt_dir / "epoch=0-step=3.ckpt")
    assert len(resumed) == 5
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_only_what_trains(tmp_path):
    _, ckpt_dir = _fit(tmp_path, max_steps=3)
    checkpoint = read_checkpoint(ckpt_dir / "last.ckpt")
    keys = list(checkpoint["state_dict"])
    # 2 layers x 7 linear layers x (lora_A, lora_B), nothing else.
    assert len(keys) == 28 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert checkpoint[META_KEY]["models"]["model"]["adapter"]["r"] == 4
    assert len(checkpoint["optimizer_states"][0]["state"]) == 28  # AdamW state for the adapters only
    assert "QLoRAPlugin" in checkpoint  # RNG states for exact resume


def test_resume_with_another_adapter_config_is_refused(tmp_path):
    _, ckpt_dir = _fit(tmp_path / "a", max_steps=3)
    with pytest.raises(ValueError, match="another adapter config.*'r': \\(4, 8\\)"):
        _fit(tmp_path / "b", max_steps=4, ckpt_path=ckpt_dir / "last.ckpt", r=8)


def test_resume_onto_another_base_model_is_refused(tmp_path):
    _, ckpt_dir = _fit(tmp_path / "a", max_steps=3)
    with pytest.raises(ValueError, match="another base model"):
        _fit(tmp_path / "b", max_steps=4, ckpt_path=ckpt_dir / "last.ckpt", seed=1)


def test_truncated_checkpoint_is_named_as_such(tmp_path):
    _, ckpt_dir = _fit(tmp_path, max_steps=3)
    data = (ckpt_dir / "last.ckpt").read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ValueError, match="not written by lightning-qlora"):
        read_checkpoint(plain)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def test_base_fingerprint_embedding_checksum_matches_the_whole_table_sum():
    from transformers import LlamaForCausalLM

    from lightning_qlora.lightning.checkpoint import base_fingerprint

    tiny_llama = LlamaForCausalLM(tiny_llama_config(vocab_size=9000))  # 3 blocks of 4096 rows

    # Checkpoints written before the blockwise sum hold the whole-table fp64 value: they must still match.
    whole = float(tiny_llama.get_input_embeddings().weight.detach().double().abs().sum())
    assert base_fingerprint(tiny_llama)["embed"] == pytest.approx(whole, rel=1e-12)


def test_adapter_checkpoint_keeps_trainable_tensors_once_and_can_leave_them_to_the_strategy():
    from torch import nn

    from lightning_qlora.lightning.checkpoint import AdapterCheckpoint

    helper, layer = AdapterCheckpoint(), nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    meta = {"format": 1, "models": {}}
    checkpoint = {"state_dict": {"weight": "gathered by FSDP"}}
    helper.save(checkpoint, layer, meta, weights=False)  # QLoRAFSDPPlugin: the strategy gathered them
    assert checkpoint == {"state_dict": {"weight": "gathered by FSDP"}, META_KEY: meta}
    checkpoint = {"state_dict": {}}
    helper.save(checkpoint, layer, meta)
    assert list(checkpoint["state_dict"]) == ["weight"]  # the frozen bias stays out
    helper.save(checkpoint, layer, {"format": 1, "models": {"other": {}}})
    assert checkpoint[META_KEY] is meta  # a checkpoint with a record is left alone


def test_rng_states_come_back_at_restore_not_at_load():
    from lightning_qlora.lightning.checkpoint import AdapterCheckpoint

    helper = AdapterCheckpoint()
    torch.manual_seed(0)
    state = helper.state_dict()
    expected = torch.rand(4)
    helper.load_state_dict(state)
    drawn_between = torch.rand(4)  # loading alone does not rewind the stream
    helper.rng.restore()
    assert torch.equal(torch.rand(4), expected) and not torch.equal(drawn_between, expected)
    helper.rng.restore()  # only once: a second call keeps the stream going
    assert not torch.equal(torch.rand(4), expected)
