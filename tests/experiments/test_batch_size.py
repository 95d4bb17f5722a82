import matplotlib

matplotlib.use("Agg")

# Notebook 05's studies: mini-batch sharpness against the dense Hessian and its invariants, the
# scaling rules, the lockstep population against torch.optim, and their progress. The explorer:
# tests/widgets/test_batch_size_explorer.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.batch_size import (  # noqa: E402
    minibatch_sharpness,
    minibatch_top_eigenpair,
    scaled_lr,
    scaling_check,
    train_population,
)
from fixtures.batch_size import SIZES, curve, trained  # noqa: E402,F401 (pytest fixtures)


def test_top_eigenpair_matches_the_dense_hessian(trained):
    model, criterion, x, y = trained
    model64 = hk.models.MLP(64, (6,), 10).double()
    model64.load_state_dict(model.state_dict())
    xb, yb = x[:16].double(), y[:16]
    value, vector = minibatch_top_eigenpair(model64, criterion, xb, yb, tol=1e-8)
    H = hk.HessianOperator(model64, criterion, (xb, yb)).dense()
    exact = torch.linalg.eigvalsh(H)
    assert value == pytest.approx(exact[-1].item(), rel=1e-6)
    assert torch.allclose(H @ vector, value * vector, atol=1e-5 * value)


def test_minibatch_sharpness_invariants(curve, trained):
    n = 240
    assert list(curve.batch_sizes) == SIZES and curve.values.shape == (4, 8) and curve.num_samples == n
    # the full batch: one Hessian, repeated
    np.testing.assert_allclose(curve.values[-1], curve.full)
    np.testing.assert_allclose(curve.overlaps[-1], 1.0)
    assert curve.std[-1] == 0
    assert ((curve.overlaps >= 0) & (curve.overlaps <= 1 + 1e-4)).all()
    # Jensen: E lambda_max(H_B) >= lambda_max(H), within sampling error; sharper and noisier at small B
    assert (curve.mean >= curve.full - 3 * curve.stderr - 1e-3 * curve.full).all()
    assert curve.mean[0] > curve.mean[2] > curve.full
    assert curve.std[0] > curve.std[2] > 0
    assert curve.overlaps[0].mean() < curve.overlaps[2].mean()
    # the fit passes through the full batch and has a positive noise coefficient
    assert curve.excess_coefficient() > 0 and curve.critical_batch_size() > 0
    assert curve.model_curve(np.array([n]))[0] == pytest.approx(curve.full)
    np.testing.assert_allclose(curve.max_stable_lr(), 2 / curve.mean)
    # deterministic
    model, criterion, x, y = trained
    again = minibatch_sharpness(model, criterion, x, y, SIZES[:1], num_batches=8, seed=0)
    np.testing.assert_allclose(again.values[0], curve.values[0])


def test_minibatch_sharpness_rejects_bad_arguments(trained):
    model, criterion, x, y = trained
    with pytest.raises(ValueError, match="batch_sizes"):
        minibatch_sharpness(model, criterion, x, y, [0, 8])
    with pytest.raises(ValueError, match="batch_sizes"):
        minibatch_sharpness(model, criterion, x, y, [8, 241])
    with pytest.raises(ValueError, match="num_batches"):
        minibatch_sharpness(model, criterion, x, y, [8], num_batches=0)


def test_scaled_lr():
    assert scaled_lr(0.1, 16, 64, "none") == 0.1
    assert scaled_lr(0.1, 16, 64, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 16, 64, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 16, 4, "linear") == pytest.approx(0.025)
    with pytest.raises(ValueError, match="rule"):
        scaled_lr(0.1, 16, 64, "cubic")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_population_reproduces_torch_optim(trained, optimizer):
    _, _, x, y = trained
    x, y = x[:100].double(), y[:100]
    lrs, seeds, b, epochs = ([0.3, 0.6] if optimizer == "sgd" else [0.01, 0.03]), [3, 4], 16, 3
    start = hk.models.MLP(64, (16,), 10).double()
    for init in (None, start):
        population = train_population(optimizer, lrs, seeds, x, y, b, epochs, init=init)
        for k, (lr, seed) in enumerate(zip(lrs, seeds)):
            torch.manual_seed(seed)
            model = hk.models.MLP(64, (16,), 10).double()
            if init is not None:
                model.load_state_dict(start.state_dict())
            opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            criterion = nn.CrossEntropyLoss()
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x) - b + 1, b):
                    idx = order[i : i + b]
                    opt.zero_grad()
                    criterion(model(x[idx]), y[idx]).backward()
                    opt.step()
            with torch.no_grad():
                assert population[k] == pytest.approx(criterion(model(x), y).item(), rel=1e-9)
    with pytest.raises(ValueError, match="optimizer"):
        train_population("lbfgs", [0.1], [0], x, y, 8, 1)
    with pytest.raises(ValueError, match="batch_size"):
        train_population("sgd", [0.1], [0], x, y, 101, 1)


def test_scaling_check(trained):
    _, _, x, y = trained
    check = scaling_check(x, y, [8, 120], 8, {"sgd": 0.1, "adam": 0.01}, epochs=2, seeds=[0, 1])
    assert check.divergence_loss == pytest.approx(2 * math.log(10))
    for opt in ("sgd", "adam"):
        for rule in ("none", "sqrt", "linear"):
            assert check.losses[opt][rule].shape == (2, 2)
        # at the base batch size every rule is the same run
        np.testing.assert_allclose(check.losses[opt]["none"][0], check.losses[opt]["linear"][0])
        # same lr, 15x fewer steps: worse; a larger step recovers part of it
        assert check.losses[opt]["none"][1].mean() > check.losses[opt]["none"][0].mean()
        assert check.losses[opt]["sqrt"][1].mean() < check.losses[opt]["none"][1].mean()
    np.testing.assert_allclose(check.lr("sgd", "linear"), [0.1, 1.5])
    # a huge rate diverges and is reported as such
    wild = scaling_check(x, y, [8], 8, {"sgd": 100.0}, epochs=1, seeds=[0], rules=("none",))
    mean, std, diverged = wild.summary("sgd", "none")
    assert diverged[0] == 1 and np.isnan(mean[0])
    mean, std, diverged = check.summary("sgd", "none")
    assert (diverged == 0).all() and np.isfinite(mean).all()


def test_long_computations_report_progress(trained, progress_to):
    model, criterion, x, y = trained
    curve_reports, reports = [], []
    progress_to(lambda done, total, what: curve_reports.append((done, total, what)))
    minibatch_sharpness(model, criterion, x, y, [8, 240], num_batches=3, seed=0)
    progress_to(lambda done, total, what: reports.append((done, total, what)))
    scaling_check(x, y, [8, 120], 8, {"sgd": 0.1, "adam": 0.01}, epochs=1, seeds=[0])
    assert curve_reports == [(k, 6, "mini-batch Hessians") for k in range(1, 7)]
    assert [(d, t) for d, t, _ in reports] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert reports[0][2] == "scaling check (sgd, B = 8)" and reports[-1][2] == "scaling check (adam, B = 120)"
