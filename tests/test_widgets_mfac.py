import matplotlib

matplotlib.use("Agg")

# Notebook 09's M-FAC explorer and the computations behind it: every control driven through its
# extreme values, training invariants (same initialisation, the F >= damping*I step bound, Newton-CG's
# bookkeeping), and the IHVP accuracy and float32 studies against dense solves.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.widgets.mfac import (  # noqa: E402
    MFACExplorer,
    dense_solve_timing,
    fill_window,
    float32_errors,
    ihvp_errors,
    ihvp_timing,
    make_optimizer,
    step_costs,
    tiny_fisher_problem,
    train,
    tune,
)



@pytest.fixture(scope="module")
def data():
    (x, y), (x_test, y_test) = hk.data.digits(flatten=True)
    return (x[:256], y[:256]), (x_test[:100], y_test[:100])


@pytest.fixture(scope="module")
def problem():
    return tiny_fisher_problem(num_samples=64, train_steps=10)


@pytest.fixture(scope="module")
def tuning(data):
    return tune([1e-2, 1e-1], *data, steps=20, batch_size=32, eval_every=5,
                optimizers=("mfac", "sgd", "adamw", "newton-cg"), grids={"newton-cg": [0.03]}, max_cg_iters=3)


def test_explorer_over_its_controls(tuning, problem):
    explorer = MFACExplorer(tuning, problem, max_grads=128)
    explorer.show()
    result = explorer.result
    assert result["run"] is tuning.best("mfac")  # the tuned run is reused, not retrained
    assert result["num_grads"] == tuning.num_grads == 32 and result["damping"] == tuning.damping
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
    assert not run.diverged and abs(run.train_loss[-1] - run.train_loss[0]) < 0.01
    assert (run.step_norm <= 1e-4 * run.grad_norm * (1 + 1e-4)).all()
    lr.value = 10**lr.max  # lr 1 at damping 1: steps of at most |g|
    run = explorer.result["run"]
    assert (run.step_norm[np.isfinite(run.step_norm)] <= run.grad_norm[np.isfinite(run.step_norm)] * (1 + 1e-4)).all()
    assert run.diverged or math.isfinite(run.final_loss)
    assert len(run.steps) == len(run.train_loss) == len(run.test_accuracy)
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


def test_train_shares_initialisation_and_obeys_the_damping_bound(data):
    runs = {name: train(name, 0.05, *data, steps=6, batch_size=32, eval_every=2, damping=1e-2, max_cg_iters=4)
            for name in ("mfac", "sgd", "adamw", "newton-cg")}
    first = {name: r.train_loss[0] for name, r in runs.items()}
    assert len(set(first.values())) == 1  # same initial weights for every optimizer
    assert all(r.steps.tolist() == [0, 2, 4, 6] and len(r.step_times) == 6 for r in runs.values())
    mfac = runs["mfac"]
    # F >= damping * I, so |F^{-1} g| <= |g| / damping and every step is at most lr |g| / damping
    assert (mfac.step_norm <= 0.05 * mfac.grad_norm / 1e-2 * (1 + 1e-5)).all()
    assert mfac.settings == {"num_grads": 32, "damping": 1e-2}
    assert (np.abs(mfac.step_cosine) <= 1 + 1e-6).all() and mfac.step_cosine[0] == pytest.approx(1, abs=1e-5)
    newton = runs["newton-cg"]
    assert (newton.cg_iterations >= 1).all() and (newton.cg_iterations <= 4).all()
    assert newton.lm_damping[0] == 1.0 and (newton.lm_damping > 0).all()
    for name in ("mfac", "sgd", "adamw"):
        assert np.isnan(runs[name].cg_iterations).all() and np.isnan(runs[name].lm_damping).all()
    again = train("sgd", 0.05, *data, steps=6, batch_size=32, eval_every=2)
    np.testing.assert_array_equal(again.train_loss, runs["sgd"].train_loss)  # same batches, same order
    sgd = runs["sgd"]  # plain SGD's first step (no momentum yet) is exactly lr * g
    assert sgd.step_norm[0] == pytest.approx(0.05 * sgd.grad_norm[0], rel=1e-4)


def test_full_batch_and_divergence(data):
    (x, y), test = data
    run = train("mfac", 1.0, (x, y), test, steps=10, batch_size=len(x), eval_every=1, damping=1e-6)
    assert run.batch_size == len(x)
    if run.diverged:
        assert math.isinf(run.final_loss) and np.isnan(run.train_loss).any()
    assert (run.step_norm[np.isfinite(run.step_norm)] <= run.grad_norm[np.isfinite(run.step_norm)] / 1e-6 * 1.001).all()


def test_window_inverse_and_ihvp_errors_against_dense_solves(problem):
    G = problem.grads
    inv = fill_window(G[:10], 4, 1e-2)  # the ring buffer keeps the last 4 rows
    F = 1e-2 * torch.eye(problem.dim, dtype=torch.float64) + G[6:10].T @ G[6:10] / 4
    x = problem.x
    assert ((inv @ x - torch.linalg.solve(F, x)).norm() / torch.linalg.solve(F, x).norm()) < 1e-8
    errors = ihvp_errors(problem, [1, 8, 64], 1e-3)
    assert errors.windows.tolist() == [1, 8, 64] and errors.window[-1] < 1e-9
    assert errors.window[0] > 1e-3 and errors.num_samples == 64 and errors.dim == 610
    assert torch.allclose(problem.exact(1e-3), torch.linalg.solve(problem.fisher(1e-3), x))
    with pytest.raises(ValueError, match="windows"):
        ihvp_errors(problem, [65], 1e-3)
    with pytest.raises(ValueError, match="num_samples"):
        tiny_fisher_problem(num_samples=1)


def test_float32_caveat(problem):
    f = float32_errors(problem, 16, [1e-8, 1e-2, 1.0])
    assert f["woodbury"][0] > 1e3 * f["woodbury"][-1]  # grows like 1 / damping
    assert f["update_and_apply"].max() < 1e-5  # the optimizer's product keeps float32 accuracy
    assert f["update_and_apply"][0] < 1e-2 * f["woodbury"][0]
    assert 0.1 < f["woodbury"][0] / f["predicted"][0] < 10  # the cancellation estimate is right within 10x


def test_timings_and_step_costs(data):
    seconds = ihvp_timing([256, 1024], [4, 8], repeats=1)
    assert seconds.shape == (2, 2) and (seconds > 0).all()
    dense = dense_solve_timing([64, 128], repeats=1)
    assert dense.shape == (2,) and (dense > 0).all()
    costs = step_costs(data[0], rounds=3, num_grads=(4,), newton=False)
    assert costs.labels == ["AdamW", "SGD-momentum", "M-FAC, m = 4"] and costs.seconds.shape == (3, 3)
    assert costs.ratio("AdamW") == 1.0 and costs.median("M-FAC, m = 4") > 0


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("lbfgs", [torch.zeros(2, requires_grad=True)], 0.1)
    with pytest.raises(ValueError, match="batch_size"):
        train("sgd", 0.1, *data, batch_size=1000)
    with pytest.raises(ValueError, match="steps"):
        train("sgd", 0.1, *data, steps=0)
    with pytest.raises(ValueError, match="grid"):
        tune([-1.0], *data, steps=2)


# --------------------------------------------------------------------------- progress
def test_explorer_shows_training_and_ihvp_progress(tuning, problem):
    explorer = MFACExplorer(tuning, problem, num_grads=8, damping=1e-3, lr=3e-2)
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.show()  # a new setting: trains M-FAC, then the IHVP errors at its damping
    bars = [v for v in seen if "<progress" in v]
    assert "M-FAC step 1/20" in bars[0] and any("M-FAC step 20/20" in v for v in bars)
    windows = len(explorer._windows(8))
    assert f"IHVP error: window {windows}/{windows}" in bars[-1]
    assert explorer.status.value == ""
