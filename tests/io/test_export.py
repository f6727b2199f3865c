"""Export against the stock stack, and merging into a plain model that loads without peft or bitsandbytes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin
from lightning_qlora.core.adapters import check_adapter_dir
from lightning_qlora.io.export import MERGED_KEY
from lightning_qlora.io.merge import merge
from lightning_qlora.tasks import SequenceClassificationModule
from tests.conftest import counting_batches, loader, quiet_trainer, tiny_llama_config
from tests.tasks.test_classification import _batches as class_batches


def _train_and_export(module, batches, base_dir, adapter_dir, steps=10):
    module.model.save_pretrained(base_dir)  # the base as a user would have it on disk, before quantization
    trainer = quiet_trainer(
        plugins=[QLoRAPlugin()],
        callbacks=[LoRAAdapters(r=8, alpha=16, dropout=0.0, export_dir=adapter_dir)],
        max_steps=steps,
    )
    trainer.fit(module, loader(batches))
    module.model.eval()
    return module.model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    module = CausalLMModule(LlamaForCausalLM(tiny_llama_config()), lr=1e-2, warmup_steps=0)
    model = _train_and_export(module, counting_batches(10), tmp / "base", tmp / "adapter")
    ids = counting_batches(1, seed=3)[0]["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return tmp, ids, logits


def test_stock_transformers_bnb_plus_stock_peft_match_ours(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tmp, ids, ours = trained
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tmp / "base", quantization_config=quant, device_map="cpu")
    for module in base.modules():
        # On AVX512-BF16 CPUs stock bitsandbytes repacks 4-bit weights at the first eval
        # forward and multiplies in bf16 (max logit difference ~0.4 here); we keep fp32.
        # Same kernel on both sides, so what is compared is quantization and adapter.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    stock = PeftModel.from_pretrained(base, tmp / "adapter").eval()
    with torch.no_grad():
        theirs = stock(input_ids=ids).logits
        with stock.disable_adapter():
            plain = stock(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters, so the match is not vacuous
    meta = json.loads((tmp / "adapter" / "lightning_qlora.json").read_text())
    assert meta["quant"] == {
        "quant_type": "nf4",
        "double_quant": True,
        "quant_storage": "uint8",
        "skip_modules": [],
        "int8_modules": [],
    }


def test_merged_model_loads_without_peft_or_bitsandbytes_and_matches(trained):
    tmp, ids, ours = trained
    out = merge(tmp / "adapter", tmp / "merged32", base=str(tmp / "base"), dtype="fp32")
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    # A fresh interpreter where importing peft or bitsandbytes fails.
    script = (
        "import sys, torch; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): torch.save(m(input_ids=ids).logits, sys.argv[1])\n"
    )
    result_path = tmp / "merged_logits.pt"
    done = subprocess.run([sys.executable, "-c", script, str(result_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = torch.load(result_path, weights_only=True)
    # fp32 merge: dequant(quant(W)) + BA is the function the adapter trained against.
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and MERGED_KEY in config


def test_bf16_merge_is_within_rounding(trained):
    from transformers import AutoModelForCausalLM

    tmp, ids, ours = trained
    out = merge(tmp / "adapter", tmp / "merged16", base=str(tmp / "base"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per weight), compounded over layers.
    rel = float((merged - ours).norm() / ours.norm())
    assert rel < 0.02, rel
    assert (merged.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


def test_merging_twice_or_over_a_model_is_refused(trained):
    tmp, _, _ = trained
    out = merge(tmp / "adapter", tmp / "once", base=str(tmp / "base"), dtype="fp32")
    with pytest.raises(ValueError, match="already has an adapter merged"):
        merge(tmp / "adapter", tmp / "twice", base=str(out))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds files.*--force"):
        merge(tmp / "adapter", out, base=str(tmp / "base"))
    assert (out / "model.safetensors").read_bytes() == before  # untouched
    merge(tmp / "adapter", out, base=str(tmp / "base"), dtype="fp32", force=True)
    assert (out / "model.safetensors").read_bytes() == before  # same inputs, same merge


def test_adapter_dir_with_missing_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks adapter_model.safetensors"):
        check_adapter_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_adapter_dir(tmp_path / "nope")


def test_classification_model_merges_with_its_trained_head(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=3))
    module = SequenceClassificationModule(model, num_labels=3, lr=1e-2, warmup_steps=0)
    trained = _train_and_export(module, class_batches(10, seed=1), tmp_path / "base", tmp_path / "adapter")
    ids = class_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        ours = trained(input_ids=ids).logits
    out = merge(tmp_path / "adapter", tmp_path / "merged", base=str(tmp_path / "base"), dtype="fp32")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = merged(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
