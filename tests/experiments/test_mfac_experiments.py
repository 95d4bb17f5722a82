import matplotlib

matplotlib.use("Agg")

# Notebook 09's computations: training invariants (same initialisation, the F >= damping*I step bound,
# Newton-CG's bookkeeping), the IHVP accuracy and float32 studies against dense solves, the timings and
# the argument checks. The explorer: tests/widgets/test_mfac_explorer.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.mfac import (  # noqa: E402
    LABELS,
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
from hesskit.experiments.tasks import digits_mlp, fit_classifier  # noqa: E402
from hesskit.experiments.training import batch_order  # noqa: E402
from fixtures.mfac import data, problem  # noqa: E402,F401 (pytest fixtures)


def test_train_shares_initialisation_and_obeys_the_damping_bound(data):
    runs = {name: train(name, 0.05, *data, steps=6, batch_size=32, eval_every=2, damping=1e-2, max_cg_iters=4)
            for name in ("mfac", "sgd", "adamw", "newton-cg")}
    first = {name: r.evals["train_loss"][0] for name, r in runs.items()}
    assert len(set(first.values())) == 1  # same initial weights for every optimizer
    assert all(r.eval_steps.tolist() == [0, 2, 4, 6] and r.log.steps_taken == 6 for r in runs.values())
    assert all(r.label == f"{LABELS[name]} (lr 0.05)" for name, r in runs.items())
    mfac = runs["mfac"].per_step
    # F >= damping * I, so |F^{-1} g| <= |g| / damping and every step is at most lr |g| / damping
    assert (mfac["step_norm"] <= 0.05 * mfac["grad_norm"] / 1e-2 * (1 + 1e-5)).all()
    assert runs["mfac"].settings == {"batch_size": 32, "seed": 0, "steps": 6, "eval_every": 2, "num_grads": 32,
                                     "damping": 1e-2}
    cosine = mfac["step_cosine"]
    assert (np.abs(cosine) <= 1 + 1e-6).all() and cosine[0] == pytest.approx(1, abs=1e-5)
    newton = runs["newton-cg"].per_step
    assert (newton["cg_iterations"] >= 1).all() and (newton["cg_iterations"] <= 4).all()
    assert newton["lm_damping"][0] == 1.0 and (newton["lm_damping"] > 0).all()
    for name in ("mfac", "sgd", "adamw"):
        per_step = runs[name].per_step
        assert np.isnan(per_step["cg_iterations"]).all() and np.isnan(per_step["lm_damping"]).all()
    again = train("sgd", 0.05, *data, steps=6, batch_size=32, eval_every=2)
    # same batches, same order
    np.testing.assert_array_equal(again.evals["train_loss"], runs["sgd"].evals["train_loss"])
    sgd = runs["sgd"].per_step  # plain SGD's first step (no momentum yet) is exactly lr * g
    assert sgd["step_norm"][0] == pytest.approx(0.05 * sgd["grad_norm"][0], rel=1e-4)


def test_full_batch_and_divergence(data):
    (x, y), test = data
    run = train("mfac", 1.0, (x, y), test, steps=10, batch_size=len(x), eval_every=1, damping=1e-6)
    assert run.settings["batch_size"] == len(x)
    if run.diverged:
        assert math.isinf(run.final_loss) and np.isnan(run.evals["train_loss"]).any()
    step_norm, grad_norm = run.per_step["step_norm"], run.per_step["grad_norm"]
    assert (step_norm[np.isfinite(step_norm)] <= grad_norm[np.isfinite(step_norm)] / 1e-6 * 1.001).all()


def test_a_non_finite_loss_stops_the_run_at_its_step(data, progress_to):
    (x, y), test = data
    x = x.clone()
    x[100] = math.nan  # one training digit poisons its batches (and every full-data evaluation)
    first = next(t for t, idx in enumerate(batch_order(len(x), 20, 32, 0), start=1) if 100 in idx.tolist())
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total, what)))
    for name in ("mfac", "sgd", "newton-cg"):
        calls.clear()
        run = train(name, 0.05, (x, y), test, steps=20, batch_size=32, eval_every=20)
        assert run.diverged and math.isinf(run.final_loss) and run.log.steps_taken == first
        grad_norm = run.per_step["grad_norm"]
        assert np.isfinite(grad_norm[: first - 1]).all() and np.isnan(grad_norm[first - 1 :]).all()
        assert calls == [(t, 20, f"{LABELS[name]} step") for t in range(1, first)]


def test_tiny_fisher_problem_is_the_trained_models_per_sample_gradients():
    problem = tiny_fisher_problem(hidden=(4,), num_samples=16, train_steps=3, seed=1)
    (x, y), _ = hk.data.digits(flatten=True, seed=1)
    x, y = x[:16].double(), y[:16]
    model = fit_classifier(digits_mlp((4,), seed=1, dtype=torch.float64), (x, y), 3, lr=1e-2, optimizer="adamw")
    for i in (0, 15):
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
        torch.testing.assert_close(problem.grads[i], grad)
    torch.testing.assert_close(problem.x, problem.grads.mean(dim=0))


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
