"""The committed bench JSONs back what the docs say of them: both sides start at the same loss.

bench/README.md and docs/benchmarks.md cite these first losses and their tolerance; this reads the
files, so a re-run that drifts, or a doc that claims more than the files hold, fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
# The worker keeps 6 decimals of each loss, so two losses that round apart by one unit (14.432046
# and 14.432047) may truly differ by anything below 2e-6; that is the bound the docs claim.
FIRST_LOSS_TOLERANCE = 2e-6
# The speed runs the docs cite, and each one's first losses (ours, peer) as the docs quote them.
QUOTED = {
    "cpu-final.json": (14.432046, 14.432047),
    "cpu-final-torch-dropout.json": (14.432046, 14.432047),
    "cpu-glibc.json": (14.432046, 14.432046),
    "cpu-pin64k.json": (14.432046, 14.432046),
    "cpu-nogc.json": (14.432046, 14.432046),
}


# Start to first step at three model sizes (bench/README.md, "Setup"): the same loss on both sides too.
SETUP = ("setup.json", "setup-360m.json", "setup-1.7b.json")


def _first_losses(name: str) -> dict[str, list[float]]:
    records = json.loads((RESULTS / name).read_text())["records"]
    return {side: [run["losses"][0] for run in runs] for side, runs in records.items()}


def test_every_speed_json_is_quoted():
    with_losses = {p.name for p in RESULTS.glob("*.json") if "first_loss_abs_diff" in json.loads(p.read_text())}
    assert with_losses == set(QUOTED) | set(SETUP), "a bench JSON was added or removed: quote it here and in the docs"


@pytest.mark.parametrize("name", sorted(QUOTED))
def test_both_sides_start_at_the_quoted_loss(name):
    first = _first_losses(name)
    ours, peer = QUOTED[name]
    assert len(first["ours"]) == len(first["peer"]) >= 3  # every run, not a median
    assert set(first["ours"]) == {ours} and set(first["peer"]) == {peer}
    assert abs(ours - peer) <= FIRST_LOSS_TOLERANCE
    recorded = json.loads((RESULTS / name).read_text())["first_loss_abs_diff"]
    assert recorded == pytest.approx(abs(ours - peer), abs=1e-12)


def test_matrix_cells_start_at_the_same_loss_and_the_readme_quotes_the_worst_cell():
    data = json.loads((RESULTS / "matrix.json").read_text())
    cells = data["results"]
    assert sorted(cells) == list("ABCDEF")
    for name, cell in cells.items():
        ours, peer = cell["records"]["ours"], cell["records"]["peer"]
        assert len(ours) == len(peer) >= 3, name
        for o, p in zip(ours, peer, strict=True):
            assert abs(o["losses"][0] - p["losses"][0]) <= FIRST_LOSS_TOLERANCE, name
    # The README's headline is the matrix's worst cell, in step time and in peak RSS.
    readme = (RESULTS.parents[1] / "README.md").read_text()
    for key, label in (("median_step_s", "step"), ("peak_rss_mib", "peak RSS")):
        worst = max(cells, key=lambda c, k=key: cells[c]["ratio_ours_over_peer"][k])
        assert data["worst"][key]["cell"] == worst
        quoted = f"{label} {cells[worst]['ratio_ours_over_peer'][key]:.2f}x (cell {worst})"
        assert quoted in readme, quoted


def _scaling_row(point: dict) -> str:
    label = point.get("model", point["seq"])
    return (
        f"| {label} | {point['ours_step_ms_per_token']:.2f} | {point['peer_step_ms_per_token']:.2f}"
        f" | {point['step_ratio']:.3f} | {point['ours_peak_rss_mib']:.0f} | {point['peer_peak_rss_mib']:.0f}"
        f" | {point['rss_ratio']:.3f} |"
    )


def test_scaling_json_backs_the_cost_growth_table():
    data = json.loads((RESULTS / "scaling.json").read_text())
    readme = (RESULTS.parent / "README.md").read_text()
    assert sorted(data["axes"]) == ["model", "seq"]
    assert [p["seq"] for p in data["axes"]["seq"]["points"]] == [128, 512, 1024, 2048]
    assert [p["model"] for p in data["axes"]["model"]["points"]] == ["smollm2-135m", "smollm2-360m", "smollm2-1.7b"]
    for axis in data["axes"].values():
        points = axis["points"]
        for point in points:
            assert _scaling_row(point) in readme, _scaling_row(point)
            ratios = point["result"]["ratio_ours_over_peer"]
            assert point["step_ratio"] == ratios["median_step_s"]
            assert point["rss_ratio"] == ratios["peak_rss_mib"]
            ours, peer = point["first_loss"]
            assert abs(ours - peer) <= FIRST_LOSS_TOLERANCE, point
        for key, growth in axis["growth"].items():
            # The target: the ratio at the largest point at most 0.05 above the smallest point's.
            assert growth["first"] == pytest.approx(points[0][key]) and growth["last"] == pytest.approx(points[-1][key])
            assert growth["met"] == (points[-1][key] <= points[0][key] + 0.05)
    # The README's front door quotes the sequence-length growth of the step ratio.
    seq = data["axes"]["seq"]["growth"]["step_ratio"]
    quoted = f"{seq['first']:.2f}x at 128 tokens, {seq['last']:.2f}x at 2,048"
    assert quoted in (RESULTS.parents[1] / "README.md").read_text(), quoted


def test_lever_jsons_back_the_quoted_ratios():
    readme = (RESULTS.parent / "README.md").read_text()
    loss = json.loads((RESULTS / "levers-loss.json").read_text())["ratio_chunked_over_whole"]
    ckpt = json.loads((RESULTS / "levers-checkpointing.json").read_text())["ratio_over_every_layer"]
    pad = json.loads((RESULTS / "levers-padding.json").read_text())["ratio_padding_free_over_padded"]
    # (the row's first cell, how the row ends): the measured values sit between them.
    quoted = [
        ("| median step (s) |", f"| {loss['median_step_s']:.3f} |"),
        ("| peak RSS (MiB) |", f"| {loss['peak_rss_mib']:.3f} |"),
        (
            "| every 2nd layer",
            f"| {ckpt['every_2nd']['median_step_s']:.3f} | {ckpt['every_2nd']['peak_rss_mib']:.3f} |",
        ),
        ("| none (`false`)", f"| {ckpt['none']['median_step_s']:.3f} | {ckpt['none']['peak_rss_mib']:.3f} |"),
        ("| real tokens/s |", f"| **{pad['tokens_per_s']:.3f}** |"),
        ("| training peak RSS (MiB) |", f"| {pad['train_peak_rss_mib']:.3f} |"),
    ]
    rows = [line for line in readme.splitlines() if line.startswith("|")]
    for head, tail in quoted:
        assert any(r.startswith(head) and r.endswith(tail) for r in rows), (head, tail)


@pytest.mark.parametrize("name", SETUP)
def test_setup_jsons_back_the_setup_table(name):
    result = json.loads((RESULTS / name).read_text())
    losses = [loss for side in _first_losses(name).values() for loss in side]
    assert max(losses) - min(losses) <= FIRST_LOSS_TOLERANCE
    ours, peer = result["ours"]["setup_s"], result["peer"]["setup_s"]
    row = f"| {ours:.1f} | {peer:.1f} | **{result['ratio_ours_over_peer']['setup_s']:.3f}** |"
    readme = (RESULTS.parent / "README.md").read_text()
    assert any(line.startswith(f"| [{name}]") and line.endswith(row) for line in readme.splitlines()), row
