"""Adapter-only checkpoints, exact resume, and the checks that refuse a wrong checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.io.atomic import DiskFullError, remove_stale_temps
from lightning_qlora.lightning.checkpoint import META_KEY, AtomicCheckpointIO, _umask, read_checkpoint
from lightning_qlora.tasks.data import PromptAnswerDataModule
from tests.conftest import LossRecorder, file_size_limit, quiet_trainer, tiny_llama_config
from tests.tasks.data.test_formatting import CharTokenizer

ROWS = [{"p": f"add {a} and {b}", "a": str(a + b)} for a in range(5) for b in range(5)]  # 25 rows


def _model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=256, max_position_embeddings=128))


def _data() -> PromptAnswerDataModule:
    splits = {"train": ROWS[:20], "validation": ROWS[20:]}
    return PromptAnswerDataModule(CharTokenizer(), splits, lambda r: (r["p"], r["a"]), max_length=32, batch_size=4)


def _fit(tmp_path, max_steps, ckpt_path=None, r=4, seed=0, model=None, plugin=None):
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer = quiet_trainer(
        max_steps=max_steps,
        plugins=[plugin or QLoRAPlugin(), AtomicCheckpointIO()],
        # dropout > 0: the resumed run must draw the same dropout masks as the uninterrupted one.
        callbacks=[LoRAAdapters(r=r, alpha=8, dropout=0.1, gradient_checkpointing=False), checkpoints, recorder],
        enable_checkpointing=True,
        limit_val_batches=0,
    )
    module = CausalLMModule(model if model is not None else _model(seed), lr=5e-3, warmup_steps=2)
    trainer.fit(module, _data(), ckpt_path=ckpt_path, weights_only=True)
    return recorder.losses, tmp_path / "ckpt"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The checkpoint folder of a 3-step run (seed 0), which the tests below resume or read, never write."""
    return _fit(tmp_path_factory.mktemp("first"), max_steps=3)[1]


def test_resume_continues_the_same_loss_curve(tmp_path):
    # 20 rows / batch 4 = 5 batches per epoch: step 3's checkpoint is mid-epoch, and the
    # resumed run crosses an epoch boundary at step 5.
    full, ckpt_dir = _fit(tmp_path / "a", max_steps=8)
    assert len(full) == 8
    resumed, _ = _fit(tmp_path / "b", max_steps=8, ckpt_path=ckpt_dir / "epoch=0-step=3.ckpt")
    assert len(resumed) == 5
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_only_what_trains(first_run):
    checkpoint = read_checkpoint(first_run / "last.ckpt")
    keys = list(checkpoint["state_dict"])
    # 2 layers x 7 linear layers x (lora_A, lora_B), nothing else.
    assert len(keys) == 28 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert checkpoint[META_KEY]["models"]["model"]["adapter"]["r"] == 4
    assert len(checkpoint["optimizer_states"][0]["state"]) == 28  # AdamW state for the adapters only
    assert "QLoRAPlugin" in checkpoint  # RNG states for exact resume


def test_resume_with_another_adapter_config_is_refused(first_run, tmp_path):
    with pytest.raises(ValueError, match="another adapter config.*'r': \\(4, 8\\)"):
        _fit(tmp_path, max_steps=4, ckpt_path=first_run / "last.ckpt", r=8)


def test_resume_with_another_quant_config_is_refused_naming_the_key(first_run, tmp_path):
    from lightning_qlora import AdapterConfig
    from lightning_qlora.app.train import resolve_resume

    expected = (
        r"^checkpoint .*last\.ckpt was saved with another quant config;"
        r" differences \(saved, now\): \{'quant_type': \('nf4', 'fp4'\)\}\. Use the quant settings"
    )
    # The command line refuses it before any model loads; Lightning's resume, once the model is set up.
    same_adapters = AdapterConfig(r=4, alpha=8, dropout=0.1, gradient_checkpointing=False)
    with pytest.raises(ValueError, match=expected):
        resolve_resume(str(first_run / "last.ckpt"), tmp_path, QLoRAPlugin(quant_type="fp4", adapters=same_adapters))
    with pytest.raises(ValueError, match=expected) as refused:
        _fit(tmp_path, max_steps=4, ckpt_path=first_run / "last.ckpt", plugin=QLoRAPlugin(quant_type="fp4"))
    assert "\n" not in str(refused.value)


def test_resume_onto_another_base_model_is_refused(first_run, tmp_path):
    with pytest.raises(ValueError, match="another base model"):
        _fit(tmp_path, max_steps=4, ckpt_path=first_run / "last.ckpt", seed=1)


def test_resume_onto_the_same_embeddings_with_another_body_is_refused(first_run, tmp_path):
    """Same config, same embedding table (so the same embedding checksum) and head, another body: refused."""
    other, same = _model(seed=1), _model(seed=0)
    other.get_input_embeddings().weight.data.copy_(same.get_input_embeddings().weight)
    other.get_output_embeddings().weight.data.copy_(same.get_output_embeddings().weight)
    with pytest.raises(ValueError, match=r"same config and embeddings but another model\.\S+\.weight") as refused:
        _fit(tmp_path, max_steps=4, ckpt_path=first_run / "last.ckpt", model=other)
    assert "\n" not in str(refused.value)


def test_the_body_fingerprint_is_the_same_for_a_low_memory_load_and_any_load_dtype(tmp_path):
    """A base quantized while loading (its layers fingerprinted by the loading hook, before packing),
    or loaded in bf16, fingerprints as the fp32 load of the same files does: no false refusal."""
    from lightning_qlora.core.lowmem import load_quantized
    from lightning_qlora.lightning.checkpoint import AdapterCheckpoint
    from lightning_qlora.lightning.fingerprint import base_fingerprint

    _model(seed=0).save_pretrained(tmp_path / "base")
    plain = base_fingerprint(_model(seed=0))["body"]
    assert len(plain) == 2 * 9 + 3  # 2 layers x (7 Linear + 2 norms), embeddings, final norm, head
    helper = AdapterCheckpoint()
    packed, _ = load_quantized(tmp_path / "base", on_layer=helper.loaded)
    helper.remember_base("model", packed)
    assert helper.fingerprints["model"]["body"] == plain
    assert base_fingerprint(_model(seed=0).to(torch.bfloat16))["body"] == plain
    # A module trained whole (modules_to_save: a new head, randomly initialized) is no part of the base.
    assert base_fingerprint(_model(seed=0), trained=["lm_head"])["body"].keys() == plain.keys() - {"lm_head.weight"}


def test_truncated_checkpoint_is_named_as_such(first_run, tmp_path):
    data = (first_run / "last.ckpt").read_bytes()
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

    from lightning_qlora.lightning.fingerprint import base_fingerprint

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


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    with file_size_limit(64 * 1024), pytest.raises(DiskFullError) as full:
        io.save_checkpoint({"step": 2, "weights": torch.zeros(64 * 1024)}, path)  # 256 KiB
    message = str(full.value)
    assert message.startswith(f"could not write checkpoint {path}: disk full or file too large (File too large);")
    assert "\n" not in message
    # What torch raised: not an OSError, so the command line's clean-error path used to miss it.
    assert isinstance(full.value.__cause__, RuntimeError) and "unexpected pos" in str(full.value.__cause__)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    def unrelated(*args, **kwargs):
        raise RuntimeError("unrelated")

    monkeypatch.setattr(torch, "save", unrelated)  # another failure of the save is passed on as it is
    with pytest.raises(RuntimeError, match="^unrelated$"):
        io.save_checkpoint({"step": 3}, path)


def test_a_full_disk_during_export_is_one_line_and_keeps_the_previous_adapter(tmp_path):
    plugin = QLoRAPlugin()
    plugin.convert_module(_model())
    trainer = SimpleNamespace(precision_plugin=plugin, is_global_zero=True)  # all that export reads of one
    out = tmp_path / "adapter"
    LoRAAdapters().export(trainer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before["adapter_model.safetensors"]) > 64 * 1024
    with file_size_limit(32 * 1024), pytest.raises(DiskFullError) as full:
        LoRAAdapters().export(trainer, out)
    message = str(full.value)
    assert message.startswith(f"could not write adapter {out}: disk full or file too large (File too large);")
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the half-written new folder is gone


def test_what_killed_writes_leave_is_removed_and_an_adapter_moved_aside_comes_back(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    (tmp_path / ".last.ckpt.k2j3h4g5.tmp").write_bytes(b"half")  # AtomicCheckpointIO, killed mid-write
    (tmp_path / ".adapter.a1b2c3d4.tmp").mkdir()  # an export, killed while writing its new folder
    (tmp_path / ".adapter.a1b2c3d4.tmp" / "adapter_config.json").write_text("{}")
    (tmp_path / ".adapter.e5f6g7h8.old").mkdir()  # killed between moving the old folder aside and the new in
    (tmp_path / ".adapter.e5f6g7h8.old" / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "notes.tmp").write_text("a user's")  # not ours: no leading dot
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".adapter.a1b2c3d4.tmp", ".last.ckpt.k2j3h4g5.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "last.ckpt", "notes.tmp"]
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == '{"r": 4}'
