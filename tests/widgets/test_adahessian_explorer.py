import matplotlib

matplotlib.use("Agg")

# Notebook 06's explorer driven through its controls, and the training progress it shows. What it
# computes: tests/experiments/test_adahessian.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.adahessian import step_costs  # noqa: E402
from hesskit.widgets.adahessian import AdaHessianExplorer  # noqa: E402
from fixtures.adahessian import BATCH, STEPS, digits, tuning  # noqa: E402,F401 (pytest fixtures)


# --------------------------------------------------------------------------- the widget
def test_explorer_over_its_controls(tuning, digits):
    data, _ = digits
    costs = step_costs(data, update_every=(1, 4), rounds=4, batch_size=BATCH)
    explorer = AdaHessianExplorer(tuning, max_update_every=4, costs=costs)
    explorer.show()
    first = explorer.result
    assert first["run"] is tuning.best("adahessian")  # opens at the tuned run, not retrained
    assert first["lr"] == pytest.approx(tuning.best("adahessian").lr)
    assert math.isfinite(first["benchmark_ratio"]) and first["time_ratio"] > 0
    assert set(first["baselines"]) == {"adamw"} and first["num_hvps"] == STEPS
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")

    # the initial state already shows hessian_power = max, averaging "on", update_every = min, baseline "AdamW";
    # each setter below renders once, so the remaining extremes cost one render each
    controls = explorer.controls
    assert first["hessian_power"] == controls["hessian_power"].max
    assert first["update_every"] == controls["update_every"].min
    for lr in (controls["lr"].max, controls["lr"].min):
        controls["lr"].value = 10**lr
        r = explorer.result
        assert r["lr"] == pytest.approx(10**lr)
        assert r["run"].diverged == (r["final_loss"] == math.inf)
        assert len(explorer.figure.axes) == 3
    assert not explorer.result["run"].diverged  # lr 1e-3 is slow, never unstable

    controls["hessian_power"].value = controls["hessian_power"].min
    plain = explorer.result["run"]
    assert plain.settings["hessian_power"] == 0.0 and plain.settings["spatial_average"] is True
    controls["spatial_average"].value = "off"
    averaged_off = explorer.result["run"]
    assert averaged_off.settings["spatial_average"] is False
    # k = 0: the denominator is 1 + eps, so switching the averaging cannot change the trajectory
    np.testing.assert_allclose(averaged_off.extra["thetas"], plain.extra["thetas"], rtol=1e-5, atol=1e-6)

    controls["update_every"].value = controls["update_every"].max
    r = explorer.result
    assert r["update_every"] == 4 and r["num_hvps"] == math.ceil(STEPS / 4) == 3
    assert math.isfinite(r["benchmark_ratio"])  # u = 4 was benchmarked

    for baseline in ("SGD", "AdamW and SGD", "AdamW"):
        controls["baseline"].value = baseline
        expected = {"AdamW": {"adamw"}, "SGD": {"sgd"}, "AdamW and SGD": {"adamw", "sgd"}}[baseline]
        assert set(explorer.result["baselines"]) == expected
        assert all(b is tuning.best(n) for n, b in explorer.result["baselines"].items())
        ax_step, ax_time, ax_acc = explorer.figure.axes
        assert len(ax_step.get_lines()) == 1 + len(expected)
        assert ax_step.get_xlabel() == "optimizer step" and "wall-clock" in ax_time.get_xlabel()
        assert ax_acc.get_ylabel() == "test accuracy (%)"
    assert set(controls["baseline"].options) == {"AdamW", "SGD", "AdamW and SGD"}


def test_explorer_without_benchmark_and_bad_lr(tuning):
    explorer = AdaHessianExplorer(tuning)
    explorer.show()
    assert math.isnan(explorer.result["benchmark_ratio"])
    with pytest.raises(ValueError, match="lr"):
        AdaHessianExplorer(tuning, lr=10.0)


# --------------------------------------------------------------------------- progress
def test_explorer_shows_training_progress(tuning):
    explorer = AdaHessianExplorer(tuning)
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.show()  # the tuned run is reused: nothing to train, no progress bar
    assert not any("<progress" in v for v in seen)
    explorer.controls["hessian_power"].value = 0.5  # a new setting: one training run, reported step by step
    bars = [v for v in seen if "<progress" in v]
    assert "AdaHessian step 1/12" in bars[0] and f"AdaHessian step {STEPS}/{STEPS}" in bars[-1]
    assert explorer.status.value == ""
