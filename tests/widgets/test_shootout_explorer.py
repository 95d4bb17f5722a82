import matplotlib

matplotlib.use("Agg")

# Notebook 10's explorer driven through every control, and the progress of the extra runs it trains.
# What it computes: tests/experiments/test_shootout.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.shootout import run_grid, target_loss  # noqa: E402
from hesskit.widgets.shootout import BEST, LR_OPTIONS, ShootoutExplorer  # noqa: E402
from fixtures.shootout import BATCH, EVERY, FACTORS, SEEDS, STEPS, task  # noqa: E402,F401 (pytest fixtures)


WIDGET_NAMES = ["AdamW", "Sophia-G (GNB, k=10)", "K-FAC (f=10, i=100)"]  # one of each closure kind


@pytest.fixture()
def small_grid(task):
    """Three optimizers, no pilot (grids centred on the defaults); a fresh grid per test (extra runs accumulate)."""
    return run_grid(task, names=WIDGET_NAMES, seeds=SEEDS, steps=STEPS, batch_size=BATCH, record_every=EVERY,
                    factors=FACTORS)


# --------------------------------------------------------------------------- the widget
def test_explorer_drives_every_control(small_grid, monkeypatch):
    grid = small_grid
    explorer = ShootoutExplorer(grid)
    explorer.show()
    assert explorer.output.outputs[0]["data"]["image/png"]  # one real render; the rest skip the PNG encoding
    monkeypatch.setattr("hesskit.widgets.explorer.figure_output", lambda figure: {"output_type": "display_data",
                                                                               "data": {}, "metadata": {}})
    c = explorer.controls
    r = explorer.result
    assert r["target"] == pytest.approx(target_loss(grid), rel=0.05) or r["target"] in (10 ** c["target"].min,
                                                                                          10 ** c["target"].max)
    assert list(r["summary"].rows) == grid.names
    best = {n: row.best_lr for n, row in r["summary"].rows.items()}

    # optimizers: every single one, then all
    for name in grid.names:
        c["optimizers"].value = (name,)
        assert list(explorer.result["summary"].rows) == [name]
        assert len(explorer.figure.axes) >= 3
    c["optimizers"].value = ()  # nothing selected: an empty table, no error
    assert explorer.result["summary"].rows == {} and explorer.result["winner_steps"] is None
    c["optimizers"].value = tuple(grid.names)

    # x axis: both options; seconds are cumulative and non-decreasing
    for axis in ("seconds", "steps"):
        c["x_axis"].value = axis
        assert explorer.result["x_axis"] == axis
        for row in explorer.result["summary"].rows.values():
            x, mean, low, high = row.curve(axis)
            assert np.all(np.diff(x) >= 0) and np.all(low <= mean + 1e-12) and np.all(mean <= high + 1e-12)

    # target: extremes; steps to target can only fall as the target rises
    c["target"].value = 10 ** c["target"].min
    low_rows = explorer.result["summary"].rows
    c["target"].value = 10 ** c["target"].max
    high_rows = explorer.result["summary"].rows
    assert explorer.result["target"] == pytest.approx(10 ** c["target"].max)
    for name in grid.names:
        assert high_rows[name].steps_to_target <= low_rows[name].steps_to_target
        assert high_rows[name].hits >= low_rows[name].hits
    assert all(row.steps_to_target == 0 for row in high_rows.values() if row.finished == len(row.runs)
               and all(r.evals["train_loss"][0] <= explorer.result["target"] for r in row.runs))

    # lr: every option for one optimizer; grid points are looked up, off-grid points are extra runs
    c["lr_of"].value = "AdamW"
    for label, factor in LR_OPTIONS:
        c["lr"].value = factor
        row = explorer.result["summary"].rows["AdamW"]
        if factor == BEST:
            assert row.chosen == "best from grid" and row.lr == best["AdamW"]
        else:
            assert row.lr == pytest.approx(grid.centre("AdamW") * factor)
            on_grid = any(math.isclose(factor, f) for f in FACTORS)
            assert row.chosen == ("grid" if on_grid else "extra"), label
        assert row.best_lr == best["AdamW"]  # extra runs never change the tuning result
    assert grid.extra and all(k[0] == "AdamW" for k in grid.extra)

    # lr_of: switching shows that optimizer's own choice, and choices stay per optimizer
    c["lr"].value = 3.0
    for name in grid.names:
        c["lr_of"].value = name
        assert c["lr"].value == (3.0 if name == "AdamW" else BEST) and c["lr"].index is not None  # never blank
        if name != "AdamW":
            assert explorer.result["summary"].rows[name].lr == best[name]
    assert explorer.result["summary"].rows["AdamW"].lr == pytest.approx(grid.centre("AdamW") * 3.0)
    assert explorer.result["choices"]["AdamW"] == 3.0


# --------------------------------------------------------------------------- progress
def test_explorer_shows_progress_of_extra_runs(small_grid, monkeypatch):
    monkeypatch.setattr("hesskit.widgets.explorer.figure_output", lambda figure: {"output_type": "display_data",
                                                                               "data": {}, "metadata": {}})
    explorer = ShootoutExplorer(small_grid)
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.show()  # stored runs only: no training, no progress bar
    assert not any("<progress" in v for v in seen)
    explorer.controls["lr_of"].value = "AdamW"
    explorer.controls["lr"].value = 3**0.5  # between two grid points: one extra run per seed
    bars = [v for v in seen if "<progress" in v]
    lr = small_grid.centre("AdamW") * 3**0.5
    assert f"AdamW, lr {lr:.3g}: extra run 0/{len(SEEDS)}" in bars[0]
    assert f"AdamW, lr {lr:.3g}: extra run {len(SEEDS)}/{len(SEEDS)}" in bars[-1]
    assert explorer.status.value == ""
