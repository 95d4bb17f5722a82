import matplotlib

matplotlib.use("Agg")

# Notebook 09's M-FAC explorer: every control driven through its extreme values, its reuse of runs and
# IHVP sweeps computed elsewhere, and the progress it shows. What it computes:
# tests/experiments/test_mfac_experiments.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.experiments.mfac import ihvp_errors, ihvp_windows, tune  # noqa: E402
from hesskit.widgets.mfac import MFACExplorer  # noqa: E402
from fixtures.mfac import data, problem  # noqa: E402,F401 (pytest fixtures)


@pytest.fixture(scope="module")
def tuning(data):
    return tune([1e-2, 1e-1], *data, steps=20, batch_size=32, eval_every=5,
                optimizers=("mfac", "sgd", "adamw", "newton-cg"), grids={"newton-cg": [0.03]}, max_cg_iters=3)


def test_explorer_over_its_controls(tuning, problem):
    explorer = MFACExplorer(tuning, problem, max_grads=128)
    explorer.show()
    result = explorer.result
    assert result["run"] is tuning.best("mfac")  # the tuned run is reused, not retrained
    assert result["num_grads"] == tuning.setup["num_grads"] == 32 and result["damping"] == tuning.setup["damping"]
    assert set(result["baselines"]) == {"SGD-momentum", "AdamW"}
    assert len(explorer.figure.axes) == 4
    assert explorer.figure.axes[3].get_xlabel().startswith("window size m")
    assert explorer.figure.axes[1].get_xlabel().startswith("optimizer wall-clock time")

    m = explorer.controls["num_grads"]
    assert m.max == problem.num_samples == 64  # the window cannot exceed the tiny model's N
    m.value = m.max  # the window is the full empirical Fisher: the IHVP is exact
    assert explorer.result["num_grads"] == 64 and explorer.result["error_at_m"] < 1e-8
    full_window_error = explorer.result["error_at_m"]
    m.value = m.min
    e = explorer.result["errors"]
    assert explorer.result["num_grads"] == 1 and 1 in e.windows and 64 in e.windows
    assert explorer.result["error_at_m"] > 100 * full_window_error
    assert e.window.shape == e.float32.shape == e.rounding.shape == e.windows.shape

    damping = explorer.controls["damping"]
    damping.value = 10**damping.min  # 1e-6: the window is trusted in every direction
    small = explorer.result["errors"]
    assert explorer.result["damping"] == pytest.approx(1e-6)
    damping.value = 10**damping.max  # 1: close to gradient descent with lr / damping
    large = explorer.result["errors"]
    assert (large.window[:-1] < small.window[:-1]).all()  # more damping, closer to the full Fisher's product
    assert small.rounding.max() > large.rounding.max()  # float32 cancellation grows as damping shrinks

    lr = explorer.controls["lr"]
    lr.value = 10**lr.min  # lr 1e-4 at damping 1: steps of at most 1e-4 |g|, the loss barely moves
    run = explorer.result["run"]
    loss, step_norm, grad_norm = run.evals["train_loss"], run.per_step["step_norm"], run.per_step["grad_norm"]
    assert not run.diverged and abs(loss[-1] - loss[0]) < 0.01
    assert (step_norm <= 1e-4 * grad_norm * (1 + 1e-4)).all()
    lr.value = 10**lr.max  # lr 1 at damping 1: steps of at most |g|
    run = explorer.result["run"]
    step_norm, grad_norm = run.per_step["step_norm"], run.per_step["grad_norm"]
    assert (step_norm[np.isfinite(step_norm)] <= grad_norm[np.isfinite(step_norm)] * (1 + 1e-4)).all()
    assert run.diverged or math.isfinite(run.final_loss)
    assert len(run.eval_steps) == len(run.evals["train_loss"]) == len(run.evals["test_accuracy"])
    assert explorer.figure is not None

    show = explorer.controls["show"]
    for option in show.options:
        show.value = (option,)
        assert set(explorer.result["baselines"]) == {option}
        assert set(explorer.result["beats"]) == {option}
    nothing = explorer.compute(**{**explorer.values(), "show": ()})  # no baseline selected (not rendered: slow)
    assert nothing["baselines"] == {} and nothing["beats"] == {}
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_explorer_reuses_runs_and_errors(tuning, problem):
    everything = ("SGD-momentum", "AdamW", "Newton-CG (GGN)")
    explorer = MFACExplorer(tuning, problem, num_grads=8, damping=1e-2, lr=1e-1, show=everything)
    sweep = ihvp_errors(problem, [2**k for k in range(7)], 1e-2)
    extra = tuning.train("mfac", 1e-1, num_grads=8, damping=1e-2)
    explorer.add_errors([sweep])
    explorer.add_runs([extra])
    explorer.show()
    assert explorer.result["errors"] is sweep and explorer.result["run"] is extra
    assert set(explorer.result["baselines"]) == set(everything)
    assert explorer.result["baselines"]["Newton-CG (GGN)"] is tuning.best("newton-cg")
    with pytest.raises(ValueError, match="num_grads"):
        MFACExplorer(tuning, problem, num_grads=65)


# --------------------------------------------------------------------------- progress
def test_explorer_shows_training_and_ihvp_progress(tuning, problem):
    explorer = MFACExplorer(tuning, problem, num_grads=8, damping=1e-3, lr=3e-2)
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.show()  # a new setting: trains M-FAC, then the IHVP errors at its damping
    bars = [v for v in seen if "<progress" in v]
    assert "M-FAC step 1/20" in bars[0] and any("M-FAC step 20/20" in v for v in bars)
    windows = len(ihvp_windows(problem.num_samples, 8))
    assert f"IHVP error: window {windows}/{windows}" in bars[-1]
    assert explorer.status.value == ""
