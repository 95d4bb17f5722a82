import matplotlib

matplotlib.use("Agg")

import inspect  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.optim.adahessian import spatial_average  # noqa: E402
from hesskit.widgets.adahessian import (  # noqa: E402
    IMPLEMENTATIONS,
    OPTIMIZERS,
    AdaHessianExplorer,
    diagonal_study,
    digits_cnn,
    kernel_mean,
    step_costs,
    train,
    tune,
)

STEPS, BATCH, EVERY = 12, 32, 4



@pytest.fixture(scope="module")
def digits():
    (x, y), (x_test, y_test) = hk.data.digits()
    return (x[:256], y[:256]), (x_test[:64], y_test[:64])


@pytest.fixture(scope="module")
def tuning(digits):
    data, test = digits
    return tune([0.03, 0.3], data, test, steps=STEPS, batch_size=BATCH, eval_every=EVERY)


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
    first = [runs[0].thetas[0] for runs in tuning.runs.values()]
    for theta in first[1:]:
        np.testing.assert_array_equal(theta, first[0])
    again = train("adahessian", 0.03, data, test, steps=STEPS, batch_size=BATCH, eval_every=EVERY)
    np.testing.assert_array_equal(again.thetas, tuning.runs["adahessian"][0].thetas)
    np.testing.assert_array_equal(again.train_loss, tuning.runs["adahessian"][0].train_loss)


def test_run_records(tuning):
    for name in OPTIMIZERS:
        assert len(tuning.runs[name]) == len(tuning.grid)
        assert not tuning.runs[name][0].diverged  # lr 0.03 trains for every optimizer
        for run in tuning.runs[name]:
            assert list(run.steps) == [0, 4, 8, 12]
            assert run.train_loss.shape == run.test_accuracy.shape == (4,)
            assert run.thetas.shape == (4, 666)
            if run.diverged:  # stopped at the first checkpoint at or above 2 log 10
                assert run.final_loss == math.inf
                assert len(run.step_times) < STEPS or run.train_loss[-1] >= 2 * math.log(10)
                continue
            assert len(run.step_times) == STEPS and (run.step_times > 0).all()
            assert np.all(np.diff(run.wall) > 0) and run.wall[0] == 0
            assert run.num_hvps == (STEPS if name == "adahessian" else 0)
            assert abs(run.train_loss[0] - math.log(10)) < 0.2  # a near-uniform guess at init
            assert 0 <= run.final_accuracy <= 1
        best = tuning.best(name)
        assert best.final_loss == min(tuning.final_losses(name))
        assert best.train_loss[-1] < best.train_loss[0]


def test_update_every_counts_hessian_vector_products(digits):
    data, test = digits
    for u, expected in [(1, 12), (5, 3), (12, 1)]:
        run = train("adahessian", 0.03, data, test, steps=12, batch_size=BATCH, eval_every=6, update_every=u)
        assert run.num_hvps == expected and run.settings["update_every"] == u
        assert run.settings["hessian_power"] == 1.0 and run.settings["eps"] == 1e-4  # defaults recorded


def test_hessian_power_zero_ignores_the_curvature(digits):
    """k = 0: the denominator is 1 + eps whatever D is, so averaging and refresh do not matter."""
    data, test = digits
    runs = [train("adahessian", 0.3, data, test, steps=8, batch_size=BATCH, eval_every=4, hessian_power=0.0, **kw)
            for kw in ({}, {"spatial_average": False}, {"update_every": 5})]
    for run in runs[1:]:
        np.testing.assert_allclose(run.thetas, runs[0].thetas, rtol=1e-5, atol=1e-6)


def test_divergence_stops_the_run(digits):
    data, test = digits
    run = train("sgd", 100.0, data, test, steps=40, batch_size=BATCH, eval_every=4)
    assert run.diverged and run.final_loss == math.inf
    assert len(run.step_times) < 40 and np.isnan(run.train_loss[-1])
    assert np.isnan(run.wall[-1])


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
    for key, value in official.items():
        assert defaults[key].default == value  # hesskit's defaults are the official ones
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
    np.testing.assert_allclose(averaged_off.thetas, plain.thetas, rtol=1e-5, atol=1e-6)

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


def test_train_reports_every_step_outside_an_explorer_too(digits, progress_to):
    import hesskit.widgets.adahessian as adahessian

    data, test = digits
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total, what)))
    train("sgd", 0.1, data, test, steps=3, batch_size=BATCH, eval_every=EVERY)
    assert calls == [(1, 3, "SGD step"), (2, 3, "SGD step"), (3, 3, "SGD step")]
