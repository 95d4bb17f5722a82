import matplotlib

matplotlib.use("Agg")

"""Notebook 04's pure functions (slices, second differences, (S)GD with curvature logging, the
sweep and their progress), checked against the dense Hessian of a tiny network. The explorer:
tests/widgets/test_sharpness_explorer.py."""

import copy  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.sharpness import (  # noqa: E402
    digits_problem,
    loss_along,
    random_direction,
    second_difference,
    sweep,
    train,
)
from fixtures.sharpness import SMALL  # noqa: E402


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
    with pytest.raises(ValueError, match="trace_matvecs: expected 0 .no trace. or at least 4"):
        train(copy.deepcopy(model), criterion, data, 0.5, steps=2, trace_matvecs=3)  # before any step


def test_the_trace_along_training_is_hk_trace_default():
    model, criterion, data = digits_problem(**SMALL)
    run = train(copy.deepcopy(model), criterion, data, 0.5, steps=4, measure_every=None, trace_every=2,
                trace_matvecs=8, seed=3)
    assert list(run.trace_steps) == [0, 2, 4] and run.trace_method == "xtrace"
    final = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(run.params, final.parameters())
    ref = hk.trace(hk.HessianOperator(final, criterion, data), 8, seed=3)  # the default method, same seed
    assert ref.method == "xtrace"
    assert run.trace[-1] == pytest.approx(ref.value, rel=1e-10)
    assert run.trace_stderr[-1] == pytest.approx(ref.stderr, rel=1e-8) and run.trace_stderr[-1] > 0
    assert run.num_matvecs > 3 * 8  # three traces of 8 products, and lambda_max at the end
    none = train(copy.deepcopy(model), criterion, data, 0.5, steps=2, measure_every=None)
    assert none.trace_method == "" and len(none.trace) == 0


def test_sweep_marks_divergence_and_matches_train():
    model, criterion, data = digits_problem(**SMALL)
    out = sweep(model, criterion, data, [0.05, 50.0], [4, 32], steps=10, trace_matvecs=6)
    assert out["sharpness"].shape == (2, 2) and out["steps"] == 10
    assert np.isfinite(out["sharpness"][:, 0]).all() and np.isnan(out["sharpness"][:, 1]).all()
    assert np.isnan(out["trace"][:, 1]).all() and (out["sharpness_spread"][:, 0] >= 0).all()
    gd = train(copy.deepcopy(model), criterion, data, 0.05, 32, steps=10, measure_every=1, measure_from=8)
    assert out["sharpness"][1, 0] == pytest.approx(gd.sharpness.mean(), rel=1e-12)
    assert out["loss"][1, 0] == pytest.approx(gd.loss[-1], rel=1e-12)


def test_training_and_the_sweep_report_progress(progress_to):
    reports = []
    progress_to(lambda done, total, what: reports.append((done, total, what)))
    model, criterion, data = digits_problem(**SMALL)
    run = train(copy.deepcopy(model), criterion, data, 0.5, 8, steps=6, measure_every=None)
    assert reports == [(t, 6, "SGD (batch 8) step") for t in range(1, 7)] and len(run.loss) == 7
    reports.clear()
    gd = train(copy.deepcopy(model), criterion, data, 0.5, steps=3, measure_every=None)
    assert [r[2] for r in reports] == ["GD step"] * 3
    # a sweep counts the steps of all its runs; a diverged run jumps to the end of its share
    reports.clear()
    out = sweep(model, criterion, data, [0.05, 50.0], [32], steps=10, trace_matvecs=6)
    done = [d for d, _, _ in reports]
    assert {t for _, t, _ in reports} == {20} and done == sorted(done) and done[-1] == 20
    assert np.isnan(out["sharpness"][0, 1]) and any("η = 50" in what for _, _, what in reports)
