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


def _first_losses(name: str) -> dict[str, list[float]]:
    records = json.loads((RESULTS / name).read_text())["records"]
    return {side: [run["losses"][0] for run in runs] for side, runs in records.items()}


def test_every_speed_json_is_quoted():
    with_losses = {p.name for p in RESULTS.glob("*.json") if "first_loss_abs_diff" in json.loads(p.read_text())}
    assert with_losses == set(QUOTED), "a bench JSON was added or removed: quote its first losses here and in the docs"


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
