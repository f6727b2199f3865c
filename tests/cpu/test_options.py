"""``CPUOptions``, its deprecated keyword aliases, and the fast path's entry points."""

import dataclasses
import warnings

import pytest
import torch

from lightning_qlora.cpu import CPUFastPath, CPUOptions, apply, options_from_aliases

ALIASES = {"old_fast_dropout": "fast_dropout", "old_reuse": "reuse_recompute"}


def test_defaults_and_exports():
    from lightning_qlora import CPUOptions as top_level

    assert top_level is CPUOptions
    assert CPUOptions() == CPUOptions(mmap_threshold=None, release_memory=True, reuse_recompute=True, fast_dropout=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CPUOptions().fast_dropout = False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"mmap_threshold": 0},
            r"CPUOptions\(mmap_threshold=0\): expected a positive whole number of bytes \(e.g. 65536\)",
        ),
        ({"mmap_threshold": -1}, r"CPUOptions\(mmap_threshold=-1\): expected a positive whole number"),
        ({"mmap_threshold": True}, r"CPUOptions\(mmap_threshold=True\): expected a positive whole number"),
        ({"mmap_threshold": 65536.0}, r"CPUOptions\(mmap_threshold=65536.0\): expected a positive whole number"),
        ({"release_memory": "yes"}, r"CPUOptions\(release_memory='yes'\): expected True or False\."),
        ({"reuse_recompute": 1}, r"CPUOptions\(reuse_recompute=1\): expected True or False\."),
        ({"fast_dropout": None}, r"CPUOptions\(fast_dropout=None\): expected True or False\."),
    ],
)
def test_bad_values_are_named_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        CPUOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_aliases_warn_at_the_callers_line_and_set_the_fields():
    with pytest.warns(DeprecationWarning) as caught:
        options = options_from_aliases(None, {"old_reuse": False, "old_fast_dropout": False}, ALIASES, "thing")
    assert options == CPUOptions(reuse_recompute=False, fast_dropout=False)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "thing(old_reuse=...) is deprecated; pass thing(cpu=CPUOptions(reuse_recompute=False)) instead.",
        "thing(old_fast_dropout=...) is deprecated; pass thing(cpu=CPUOptions(fast_dropout=False)) instead.",
    ]
    assert {w.filename for w in caught} == {__file__}  # the user's line, not the package's


def test_no_alias_gives_cpu_or_the_defaults_silently():
    given = CPUOptions(fast_dropout=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert options_from_aliases(given, {}, ALIASES, "thing") is given
        assert options_from_aliases(None, {}, ALIASES, "thing") == CPUOptions()


def test_alias_and_cpu_together_are_refused_in_one_line():
    with pytest.raises(
        ValueError, match=r"^thing\(\) got both cpu= and the deprecated old_reuse=False; pass only cpu=,"
    ):
        options_from_aliases(CPUOptions(), {"old_reuse": False}, ALIASES, "thing")


def test_unknown_keywords_and_wrong_cpu_types_are_type_errors():
    with pytest.raises(TypeError, match=r"thing\(\) got an unexpected keyword argument 'reuse'"):
        options_from_aliases(None, {"reuse": False}, ALIASES, "thing")
    with pytest.raises(TypeError, match=r"thing\(cpu=\{'fast_dropout': False\}\): expected a CPUOptions"):
        options_from_aliases({"fast_dropout": False}, {}, ALIASES, "thing")


def _kinds(model):
    return {type(m).__name__ for m in model.modules()}


def test_apply_swaps_per_the_options(tiny_llama):
    from lightning_qlora.core.adapters import AdapterConfig, add_adapters
    from lightning_qlora.core.quantize import QuantConfig, quantize_model

    quantize_model(tiny_llama, QuantConfig())
    add_adapters(tiny_llama, AdapterConfig(r=4, dropout=0.1))
    report = apply(tiny_llama, CPUOptions(reuse_recompute=False, release_memory=False))
    assert (report.layers, report.dropouts, report.copied_bytes) == (0, 0, 0)
    assert not _kinds(tiny_llama) & {"ReuseLinear4bit", "ReplayDropout"}
    report = apply(tiny_llama, CPUOptions(fast_dropout=False))
    assert (report.layers, report.dropouts) == (14, 14) and not report.mmap_pinned
    drops = [m for m in tiny_llama.modules() if type(m).__name__ == "ReplayDropout"]
    assert len(drops) == 14 and not any(d.fast_masks for d in drops)


def test_fast_path_stays_off_away_from_cpu(tiny_llama, monkeypatch):
    from lightning_qlora.cpu import allocator

    trims = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: trims.append(1) or True)
    path = CPUFastPath(CPUOptions())
    assert path.after_setup(tiny_llama, torch.device("cuda")) is None  # torch.device("cuda") needs no GPU
    assert not path.active and not path.after_step() and path.trims == 0
    assert not _kinds(tiny_llama) & {"ReuseLinear4bit", "ReplayDropout"}
    off = CPUFastPath(CPUOptions(release_memory=False))
    off.after_setup(tiny_llama, "cpu")
    assert off.active and not off.after_step() and trims == []  # release_memory=False: never trims
