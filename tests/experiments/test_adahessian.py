import matplotlib

matplotlib.use("Agg")

# Notebook 06's experiments: the kernel mean against the optimizer's spatial averaging, the Hutchinson
# diagonal study against the exact Hessian, the training protocol and its records, the settings of
# public implementations and the interleaved step costs. The explorer:
# tests/widgets/test_adahessian_explorer.py.

import inspect  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.optim.adahessian import spatial_average  # noqa: E402
from hesskit.experiments.adahessian import (  # noqa: E402
    IMPLEMENTATIONS,
    LABELS,
    OPTIMIZERS,
    diagonal_study,
    digits_cnn,
    kernel_mean,
    step_costs,
    train,
    tune,
)
from hesskit.experiments.training import batch_order  # noqa: E402
from fixtures.adahessian import BATCH, EVERY, STEPS, digits, tuning  # noqa: E402,F401 (pytest fixtures)


# --------------------------------------------------------------------------- the diagonal study
def test_kernel_mean_matches_the_optimizers_spatial_average():
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(3, 2, 3, 3, generator=gen)
    torch.testing.assert_close(kernel_mean(d.reshape(-1), d.shape), spatial_average(d).reshape(-1))
    batch = torch.rand(d.numel(), 5, generator=gen)  # trailing probe dimension
    expected = spatial_average(batch[:, 2].reshape(d.shape)).reshape(-1)
    torch.testing.assert_close(kernel_mean(batch, d.shape)[:, 2], expected)
    flat = torch.rand(7, generator=gen)
    assert kernel_mean(flat, (7,)) is flat


def test_diagonal_study_is_unbiased_and_tracks_row_norms(digits):
    (x, y), _ = digits
    model = digits_cnn((1, 2), seed=0, dtype=torch.float64)
    study = diagonal_study(model, nn.CrossEntropyLoss(), (x[:16].double(), y[:16]), num_probes=2000, seed=1)
    n = sum(p.numel() for p in model.parameters())
    assert study.samples.shape == (n, 2000) and study.exact.shape == (n,)
    assert study.names == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
    assert study.conv_names() == ["0.weight", "3.weight"]
    H = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x[:16].double(), y[:16])).dense()
    torch.testing.assert_close(study.exact, H.diagonal())
    # Hutchinson: unbiased, with variance sum_{j != i} H_ij^2 (Bekas et al. 2007)
    mean, std = study.samples.mean(dim=1), study.samples.std(dim=1)
    z = (mean - study.exact) / (std / math.sqrt(2000)).clamp(min=1e-300)
    assert z.abs().max() < 5
    ratio = study.samples.var(dim=1) / study.theory_variance
    assert ((ratio > 0.85) & (ratio < 1.15)).all()
    # E[D_i^2] = ||H_i||^2 exactly, since z_i^2 = 1
    rms = study.samples.pow(2).mean(dim=1).sqrt()
    assert ((rms / study.row_norm - 1).abs() < 0.1).all()
    for name in study.conv_names():
        s = study.summary(name)
        assert s["variance_averaged"] < s["variance_raw"] / 4  # 9 weakly correlated entries per filter
        assert s["mse_averaged"] < s["mse_raw"]
        assert s["bias2_averaged"] >= 0
        assert study.estimates(name, averaged=True, absolute=True).min() >= 0


# --------------------------------------------------------------------------- training
def test_every_optimizer_starts_from_the_same_weights_and_is_deterministic(tuning, digits):
    data, test = digits
    first = [runs[0].extra["thetas"][0] for runs in tuning.runs.values()]
    for theta in first[1:]:
        np.testing.assert_array_equal(theta, first[0])
    again = train("adahessian", 0.03, data, test, steps=STEPS, batch_size=BATCH, eval_every=EVERY)
    np.testing.assert_array_equal(again.extra["thetas"], tuning.runs["adahessian"][0].extra["thetas"])
    np.testing.assert_array_equal(again.evals["train_loss"], tuning.runs["adahessian"][0].evals["train_loss"])


def test_run_records(tuning):
    for name in OPTIMIZERS:
        assert len(tuning.runs[name]) == len(tuning.grid)
        assert not tuning.runs[name][0].diverged  # lr 0.03 trains for every optimizer
        for run in tuning.runs[name]:
            assert list(run.eval_steps) == [0, 4, 8, 12]
            assert run.evals["train_loss"].shape == run.evals["test_accuracy"].shape == (4,)
            assert run.extra["thetas"].shape == (4, 666)
            assert run.label == f"{LABELS[name]} (lr {run.lr:.3g})"
            assert run.settings["batch_size"] == BATCH and run.settings["steps"] == STEPS
            if run.diverged:  # stopped at the first checkpoint at or above 2 log 10
                assert run.final_loss == math.inf
                assert run.log.steps_taken < STEPS or run.evals["train_loss"][-1] >= 2 * math.log(10)
                continue
            assert run.log.steps_taken == STEPS and (run.log.seconds > 0).all()
            wall = run.eval_seconds()
            assert np.all(np.diff(wall) > 0) and wall[0] == 0
            assert run.extra["num_hvps"] == (STEPS if name == "adahessian" else 0)
            assert abs(run.evals["train_loss"][0] - math.log(10)) < 0.2  # a near-uniform guess at init
            assert 0 <= run.final("test_accuracy") <= 1
        best = tuning.best(name)
        assert best.final_loss == min(tuning.final_losses(name))
        assert best.evals["train_loss"][-1] < best.evals["train_loss"][0]


def test_update_every_counts_hessian_vector_products(digits):
    data, test = digits
    for u, expected in [(1, 12), (5, 3), (12, 1)]:
        run = train("adahessian", 0.03, data, test, steps=12, batch_size=BATCH, eval_every=6, update_every=u)
        assert run.extra["num_hvps"] == expected and run.settings["update_every"] == u
        assert run.settings["hessian_power"] == 1.0 and run.settings["eps"] == 1e-4  # defaults recorded


def test_hessian_power_zero_ignores_the_curvature(digits):
    """k = 0: the denominator is 1 + eps whatever D is, so averaging and refresh do not matter."""
    data, test = digits
    runs = [train("adahessian", 0.3, data, test, steps=8, batch_size=BATCH, eval_every=4, hessian_power=0.0, **kw)
            for kw in ({}, {"spatial_average": False}, {"update_every": 5})]
    for run in runs[1:]:
        np.testing.assert_allclose(run.extra["thetas"], runs[0].extra["thetas"], rtol=1e-5, atol=1e-6)


def test_divergence_stops_the_run(digits):
    data, test = digits
    run = train("sgd", 100.0, data, test, steps=40, batch_size=BATCH, eval_every=4)
    assert run.diverged and run.final_loss == math.inf
    assert run.log.steps_taken < 40 and np.isnan(run.evals["train_loss"][-1])
    assert np.isnan(run.eval_seconds()[-1])


def test_a_non_finite_loss_stops_the_run_at_its_step(digits):
    (x, y), test = digits
    x = x.clone()
    x[100] = math.nan  # one training digit poisons its batches (and every full-data evaluation)
    first = next(t for t, idx in enumerate(batch_order(len(x), 20, BATCH, 0), start=1) if 100 in idx.tolist())
    for name in OPTIMIZERS:
        run = train(name, 0.03, (x, y), test, steps=20, batch_size=BATCH, eval_every=20)
        assert run.diverged and run.final_loss == math.inf and run.log.steps_taken == first
        # the failed step's product is not counted
        assert run.extra["num_hvps"] == (first - 1 if name == "adahessian" else 0)
        assert np.isnan(run.extra["thetas"][1:]).all()


def test_bad_input(digits):
    data, test = digits
    with pytest.raises(ValueError, match="optimizer"):
        train("lbfgs", 0.1, data, test, steps=2)
    with pytest.raises(ValueError, match="settings"):
        train("adamw", 0.1, data, test, steps=2, hessian_power=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        train("sgd", 0.1, data, test, steps=2, batch_size=10_000)
    with pytest.raises(ValueError, match="grid"):
        tune([0.0, 0.1], data, test, steps=2)
    with pytest.raises(ValueError, match="update_every"):
        step_costs(data, update_every=(0,))


def test_implementations_are_adahessian_settings():
    defaults = inspect.signature(hk.optim.AdaHessian).parameters
    official = IMPLEMENTATIONS["official (amirgholami/adahessian)"]
    for key, value in official.items():  # hesskit's defaults are the official ones, but eps (measured: see its docstring)
        assert defaults[key].default == (1e-3 if key == "eps" else value)
    assert IMPLEMENTATIONS["torch-optimizer 0.3.0 defaults"]["hessian_power"] == 0.5
    assert IMPLEMENTATIONS["pytorch-optimizer 4.1.0 defaults"]["eps"] == 1e-16
    for settings in IMPLEMENTATIONS.values():
        hk.optim.AdaHessian([nn.Parameter(torch.ones(2))], **settings)


def test_step_costs_shapes_and_ratios(digits):
    data, _ = digits
    costs = step_costs(data, update_every=(1, 2), rounds=3, batch_size=BATCH)
    assert costs.labels == ["AdamW", "SGD", "AdaHessian, u = 1", "AdaHessian, u = 2"]
    assert costs.seconds.shape == (2, 4)  # 3 rounds rounded up to 2 blocks of lcm(1, 2) = 2 steps
    assert (costs.seconds > 0).all()
    assert costs.ratio("AdamW") == 1.0 and costs.ratios().shape == (4,)


# --------------------------------------------------------------------------- progress
def test_train_reports_every_step_outside_an_explorer_too(digits, progress_to):
    data, test = digits
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total, what)))
    train("sgd", 0.1, data, test, steps=3, batch_size=BATCH, eval_every=EVERY)
    assert calls == [(1, 3, "SGD step"), (2, 3, "SGD step"), (3, 3, "SGD step")]
