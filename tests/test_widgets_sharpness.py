import matplotlib

matplotlib.use("Agg")

"""Notebook 04's sharpness explorer and its pure functions: every control through its extreme
values, results checked against the dense Hessian of a tiny network."""

import copy  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import record_progress  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.widgets.sharpness import (  # noqa: E402
    SharpnessExplorer,
    digits_problem,
    loss_along,
    random_direction,
    second_difference,
    sweep,
    train,
)

SMALL = dict(num_samples=32, hidden=(2,))  # 160 parameters: the dense Hessian is cheap



def dense_at(model, criterion, data, theta):
    probe = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, probe.parameters())
    return hk.HessianOperator(probe, criterion, data).dense()


def test_explorer_over_its_controls():
    explorer = SharpnessExplorer(**SMALL, steps=20, measure_every=5, trace_every=10, trace_matvecs=15, lr=0.1)
    explorer.show()
    first = explorer.result
    run = first["run"]
    assert first["threshold"] == pytest.approx(2 / 0.1)
    assert len(run.loss) == 21 and list(run.steps) == [0, 5, 10, 15, 20] and list(run.trace_steps) == [0, 10, 20]
    model, criterion, data = explorer.model, explorer.criterion, explorer.data
    n = sum(p.numel() for p in model.parameters())

    lr = explorer.controls["lr"]
    lr.value = 10**lr.min  # FloatLogSlider: min and max are exponents
    small = explorer.result
    assert small["lr"] == pytest.approx(0.05) and not small["diverged"]
    assert np.all(np.diff(small["run"].loss) < 0), "GD with eta * lambda_max << 2 must decrease the loss every step"
    H = dense_at(model, criterion, data, small["run"].params)
    eig = torch.linalg.eigvalsh(H)
    assert small["final_sharpness"] == pytest.approx(eig[-1].item(), abs=1e-3 * eig.abs().max().item())
    assert abs(small["final_trace"] - H.trace().item()) <= 4 * small["run"].trace_stderr[-1] + 1e-8
    assert small["run"].params.shape == (n,)

    lr.value = 10**lr.max
    big = explorer.result
    assert big["lr"] == pytest.approx(5.0) and big["diverged"]
    assert big["run"].diverged_at == len(big["run"].loss) - 1 < 20
    assert not np.isfinite(big["run"].loss[-1]) or big["run"].loss[-1] > 1e3
    assert "DIVERGED" in explorer.figure._suptitle.get_text()

    lr.value = 10**lr.min
    assert explorer.result["run"] is small["run"]  # cached: same initialisation, same answer
    gd_loss = small["run"].loss
    options = [value for _, value in explorer.controls["batch_size"].options]
    assert options == [2, 4, 8, 16, 32]
    for b in options:
        explorer.controls["batch_size"].value = b
        result = explorer.result
        assert result["batch_size"] == result["run"].batch_size == b and not result["diverged"]
        assert result["run"].loss[-1] < result["run"].loss[0]
        assert np.isfinite(result["final_sharpness"]) and result["final_sharpness"] > 0
        assert (result["run"].loss == gd_loss).all() == (b == 32)  # only the full batch is GD
        labels = [ax.get_ylabel() for ax in explorer.figure.axes]
        assert labels == ["full-batch training loss (MSE)", "sharpness λ_max", "trace of the Hessian"]
        assert all(ax.get_xlabel() == "step" for ax in explorer.figure.axes)


def test_slices_and_second_difference_match_the_dense_hessian():
    model, criterion, data = digits_problem(**SMALL)
    H = hk.HessianOperator(model, criterion, data).dense()
    eig, vecs = torch.linalg.eigh(H)
    v1 = vecs[:, -1]
    assert second_difference(model, criterion, data, v1, h=1e-3) == pytest.approx(eig[-1].item(), rel=1e-4)
    r = random_direction(model, "unit", seed=3)
    assert r.norm().item() == pytest.approx(1.0)
    assert second_difference(model, criterion, data, r, h=1e-3) == pytest.approx((r @ H @ r).item(), rel=1e-4)

    loss0 = criterion(model(data[0]), data[1]).item()
    alphas = np.linspace(-0.5, 0.5, 5)
    line = loss_along(model, criterion, data, v1, alphas)
    assert line.shape == (5,) and line[2].item() == pytest.approx(loss0, abs=1e-14)
    grid = loss_along(model, criterion, data, (v1, r), alphas)
    assert grid.shape == (5, 5) and grid[2, 2].item() == pytest.approx(loss0, abs=1e-14)
    torch.testing.assert_close(grid[:, 2], line)  # the column beta = 0 is the 1-D slice along v1
    torch.testing.assert_close(grid.T, loss_along(model, criterion, data, torch.stack([r, v1], 1), alphas))
    halves = [(data[0][:12], data[1][:12]), (data[0][12:], data[1][12:])]  # ragged batches: exact mean
    torch.testing.assert_close(loss_along(model, criterion, halves, v1, alphas), line)
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()),
                       torch.nn.utils.parameters_to_vector(digits_problem(**SMALL)[0].parameters()))  # untouched

    f = random_direction(model, "filter", seed=3)
    chunks = torch.split(f, [p.numel() for p in model.parameters()])
    for chunk, p in zip(chunks, model.parameters()):
        if p.dim() == 1:
            assert (chunk == 0).all()
        else:
            torch.testing.assert_close(chunk.view_as(p).norm(dim=1), p.detach().norm(dim=1))
    with pytest.raises(ValueError, match="normalization"):
        random_direction(model, "layer")
    with pytest.raises(ValueError, match="directions"):
        loss_along(model, criterion, data, torch.stack([r, r, r], 1), alphas)


def test_train_is_seeded_and_validates():
    model, criterion, data = digits_problem(**SMALL)
    a = train(copy.deepcopy(model), criterion, data, 0.5, 8, steps=12, measure_every=None, seed=1)
    b = train(copy.deepcopy(model), criterion, data, 0.5, 8, steps=12, measure_every=None, seed=1)
    c = train(copy.deepcopy(model), criterion, data, 0.5, 8, steps=12, measure_every=None, seed=2)
    assert np.array_equal(a.loss, b.loss) and not np.array_equal(a.loss, c.loss)
    assert list(a.steps) == [12] and len(a.trace) == 0 and a.threshold == pytest.approx(4.0)
    late = train(copy.deepcopy(model), criterion, data, 0.5, steps=12, measure_every=4, measure_from=8)
    assert list(late.steps) == [8, 12]
    with pytest.raises(ValueError, match="batch_size"):
        train(copy.deepcopy(model), criterion, data, 0.5, 64)
    with pytest.raises(ValueError, match="lr"):
        train(copy.deepcopy(model), criterion, data, 0.0)


def test_sweep_marks_divergence_and_matches_train():
    model, criterion, data = digits_problem(**SMALL)
    out = sweep(model, criterion, data, [0.05, 50.0], [4, 32], steps=10, trace_matvecs=6)
    assert out["sharpness"].shape == (2, 2) and out["steps"] == 10
    assert np.isfinite(out["sharpness"][:, 0]).all() and np.isnan(out["sharpness"][:, 1]).all()
    assert np.isnan(out["trace"][:, 1]).all() and (out["sharpness_spread"][:, 0] >= 0).all()
    gd = train(copy.deepcopy(model), criterion, data, 0.05, 32, steps=10, measure_every=1, measure_from=8)
    assert out["sharpness"][1, 0] == pytest.approx(gd.sharpness.mean(), rel=1e-12)
    assert out["loss"][1, 0] == pytest.approx(gd.loss[-1], rel=1e-12)


def test_training_and_the_sweep_report_progress():
    model, criterion, data = digits_problem(**SMALL)
    run, reports = record_progress(train, copy.deepcopy(model), criterion, data, 0.5, 8, steps=6, measure_every=None)
    assert reports == [(t, 6, "SGD (batch 8) step") for t in range(1, 7)] and len(run.loss) == 7
    gd, reports = record_progress(train, copy.deepcopy(model), criterion, data, 0.5, steps=3, measure_every=None)
    assert [r[2] for r in reports] == ["GD step"] * 3
    # a sweep counts the steps of all its runs; a diverged run jumps to the end of its share
    out, reports = record_progress(sweep, model, criterion, data, [0.05, 50.0], [32], steps=10, trace_matvecs=6)
    done = [d for d, _, _ in reports]
    assert {t for _, t, _ in reports} == {20} and done == sorted(done) and done[-1] == 20
    assert np.isnan(out["sharpness"][0, 1]) and any("η = 50" in what for _, _, what in reports)
    # the explorer's status line shows the bar while it trains
    explorer = SharpnessExplorer(**SMALL, steps=30, measure_every=10, trace_every=None, trace_matvecs=0, lr=0.1)
    explorer.show()
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["batch_size"].value = 4
    assert any("SGD (batch 4) step" in s and "<progress" in s for s in seen)
    assert explorer.status.value == ""
