import matplotlib

matplotlib.use("Agg")

# Notebook 07's explorer driven through the extremes of its controls, its reuse of runs trained
# elsewhere, and the training progress it shows. What it computes: tests/experiments/test_sophia.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.sophia import tune  # noqa: E402
from hesskit.widgets.sophia import SophiaExplorer  # noqa: E402
from fixtures.sophia import STEPS, task  # noqa: E402,F401 (pytest fixtures)


@pytest.fixture(scope="module")
def explorer(task):
    ex = SophiaExplorer(task, steps=STEPS, lr=1e-2, gamma=0.05, update_every=5, batch_size=8, target=3.0)
    ex.show()
    return ex


# --------------------------------------------------------------------------- the explorer
def test_explorer_first_render(explorer):
    r = explorer.result
    assert r["sophia"].optimizer == "sophia-g" and r["baseline"].optimizer == "adamw"
    assert r["target"] == 3.0 and len(r["runs"]) == 2
    assert r["sophia"].evals["test_loss"][0] == r["baseline"].evals["test_loss"][0]  # same initial weights
    assert 0 <= r["mean_win_rate"] <= 1
    assert len(explorer.figure.axes) == 3
    assert explorer.figure.axes[1].get_xlabel() == "training wall-clock time (s)"
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_explorer_lr_extremes(explorer):
    slider = explorer.controls["lr"]
    results = {}
    for value in (slider.min, slider.max):
        slider.value = 10**value
        results[value] = explorer.result["sophia"]
        assert explorer.result["sophia"].lr == pytest.approx(10**value)
    low, high = results[slider.min], results[slider.max]
    # steps are at most lr per coordinate: at lr 1e-4 the loss barely moves in 12 steps
    def moved(run):
        return abs(run.evals["test_loss"][-1] - run.evals["test_loss"][0])

    assert moved(low) < moved(high) or high.diverged
    slider.value = 1e-2


def test_explorer_gamma_extremes_drive_the_win_rate(explorer):
    slider = explorer.controls["gamma"]
    win = {}
    for value in (slider.min, slider.max):
        slider.value = 10**value
        win[value] = explorer.result["mean_win_rate"]
        assert explorer.result["sophia"].settings["gamma"] == pytest.approx(10**value)
    assert win[slider.min] < 0.05 < 0.5 < win[slider.max]  # gamma -> 0: sign steps; large gamma: Newton steps
    slider.value = 0.05


def test_explorer_update_every_extremes(explorer):
    slider = explorer.controls["update_every"]
    for value, refreshes in ((slider.min, STEPS), (slider.max, 1)):
        slider.value = value
        assert explorer.result["sophia"].settings["update_every"] == value
        assert explorer.result["sophia"].extra["refreshes"] == refreshes
    slider.value = 5


def test_explorer_estimators_and_baselines(explorer):
    for option in explorer.controls["estimator"].options:
        explorer.controls["estimator"].value = option
        name = explorer.result["sophia"].optimizer
        assert name == {"Sophia-G (GNB)": "sophia-g", "Sophia-H (Hutchinson)": "sophia-h"}[option]
        assert np.isfinite(explorer.result["sophia"].per_step["win_rate"]).all()
    for option in explorer.controls["baseline"].options:
        explorer.controls["baseline"].value = option
        base = explorer.result["baseline"]
        if option == "none":
            assert base is None and len(explorer.result["runs"]) == 1
        else:
            assert base.optimizer == {"AdamW": "adamw", "sign momentum": "sign"}[option]
            assert base.lr == explorer.baseline_lrs[option]
            assert set(explorer.result["steps_to"]) == {r.label for r in explorer.result["runs"]}
        assert explorer.figure is not None


def test_explorer_reuses_added_runs_and_picks_a_target(task):
    ex = SophiaExplorer(task, steps=STEPS, lr=1e-2, gamma=0.05, update_every=10, batch_size=8)
    sweep = tune(task, ["sophia-g", "adamw"], [1e-2], steps=STEPS, batch_size=8).runs
    ex.baseline_lrs["AdamW"] = 1e-2
    ex.add_runs([r for runs in sweep.values() for r in runs])
    ex.show()
    assert ex.result["sophia"] is sweep["sophia-g"][0] and ex.result["baseline"] is sweep["adamw"][0]
    # no target given: the baseline's best held-out loss plus 0.02, so the baseline reaches it
    assert ex.result["target"] == pytest.approx(np.nanmin(sweep["adamw"][0].evals["test_loss"]) + 0.02)
    assert math.isfinite(ex.result["steps_to"][sweep["adamw"][0].label])


# --------------------------------------------------------------------------- progress
def _record_status(explorer):
    """Every value the explorer's status line takes while it renders (progress bars included)."""
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    return seen


def test_explorer_shows_training_progress(task):
    ex = SophiaExplorer(task, steps=STEPS, lr=1e-2, gamma=0.05, update_every=5, batch_size=8, target=3.0)
    seen = _record_status(ex)
    ex.show()  # trains Sophia-G, then AdamW: each reports every step
    bars = [v for v in seen if "<progress" in v]
    assert "Sophia-G step 1/12" in bars[0]  # the first report shows at once
    assert any(f"Sophia-G step {STEPS}/{STEPS}" in v for v in bars)  # the last of each run always shows
    assert any(f"AdamW step {STEPS}/{STEPS}" in v for v in bars)
    assert ex.status.value == ""  # cleared when done
    seen.clear()
    ex.controls["baseline"].value = "none"  # nothing to train: no progress bar
    assert not any("<progress" in v for v in seen)
