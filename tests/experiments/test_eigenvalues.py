import matplotlib

matplotlib.use("Agg")

# Notebook 02's history helpers (power iteration recorded product by product, Lanczos by budgets),
# checked against matrices with known spectra, and the products the solver reports. The explorer:
# tests/widgets/test_eigenvalues_explorer.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.eigenvalues import (  # noqa: E402
    RecordingOperator,
    exact_extremes,
    lanczos_history,
    power_iteration_history,
    relative_errors,
)
from fixtures.eigenvalues import OUTLIERS, matrix  # noqa: E402,F401 (pytest fixtures)


def test_lanczos_history_is_monotone_and_matches_the_solver(matrix):
    A, _ = matrix
    hist = lanczos_history(A, k=4, which="largest", tol=1e-10, max_matvecs=200, seed=1)
    err = relative_errors(hist.estimates, OUTLIERS[:4], floor=0.0)
    # the top Ritz value can only improve as the Krylov subspace grows (thick restart keeps it)
    assert np.all(np.diff(err[:, 0]) <= 1e-13)
    final = hk.eigenvalues(A, k=4, tol=1e-10, max_matvecs=200, seed=1)
    np.testing.assert_allclose(hist.estimates[-1], final.values.numpy(), rtol=0, atol=0)
    assert hist.products[0] == 4 and hist.products[-1] == final.num_matvecs


def test_power_history_rate_matches_theory():
    # eigenvalues 1, 0.8, then below 0.5: the Rayleigh quotient error shrinks by (0.8)^2 per product
    n = 60
    gen = torch.Generator().manual_seed(3)
    lam = torch.cat([torch.tensor([1.0, 0.8], dtype=torch.float64),
                     0.5 * torch.rand(n - 2, generator=gen, dtype=torch.float64)])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    hist = power_iteration_history(A, k=2, max_iters=150, tol=1e-12, seed=0)
    assert hist.estimates.shape[1] == 2 and len(hist.segments) == 2
    err = relative_errors(hist.estimates[:, 0], 1.0, floor=0.0)
    start, stop = hist.segments[0]
    t = hist.products[start:stop]
    keep = (err[start:stop] > 1e-12) & (t > 10)
    factor = np.exp(np.polyfit(t[keep], np.log(err[start:stop][keep]), 1)[0])
    assert factor == pytest.approx(0.64, rel=0.05)
    # eigenvalue 2 has no estimate before its run starts, and then ends at the solver's value
    assert np.isnan(hist.estimates[: hist.segments[1][0], 1]).all()
    assert hist.estimates[-1, 1] == pytest.approx(float(hist.result.values[1]), rel=1e-12, abs=0)
    np.testing.assert_allclose(hist.result.values.numpy(), [1.0, 0.8], atol=1e-10)


def test_power_iteration_history_finds_largest_magnitude():
    # a negative eigenvalue of largest magnitude comes first
    lam = torch.tensor([-3.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    hist = power_iteration_history(A, k=2, max_iters=300, tol=1e-10, seed=0)
    np.testing.assert_allclose(hist.result.values.numpy(), [-3.0, 2.0], atol=1e-8)
    np.testing.assert_allclose(exact_extremes(A, 2, "magnitude"), [-3.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(exact_extremes(A, 2, "smallest"), [-3.0, 0.1], atol=1e-12)


def test_relative_errors_floor_and_nan():
    out = relative_errors(np.array([[1.0, np.nan], [2.0, 4.0]]), np.array([1.0, 4.0]))
    assert out[0, 0] == 1e-16 and np.isnan(out[0, 1]) and out[1, 0] == pytest.approx(1.0) and out[1, 1] == 1e-16


def test_the_solver_reports_each_product_the_recorder_keeps(progress_to):
    reports = []
    progress_to(lambda done, total, what: reports.append((done, total, what)))
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    recorder = RecordingOperator(A)
    for _ in range(4):
        recorder @ torch.ones(5, dtype=torch.float64)
    assert reports == [] and recorder.num_matvecs == 4  # the recorder records; it counts no progress
    power_iteration_history(A, k=1, max_iters=3, tol=1e-12, seed=0)  # progress off: no reports
    assert reports == []
    hist = power_iteration_history(A, k=1, max_iters=3, tol=1e-12, seed=0, progress=True)
    assert reports == [(1, 3, "power iteration"), (2, 3, "power iteration"), (3, 3, "power iteration")]
    assert hist.result.num_matvecs == 3
