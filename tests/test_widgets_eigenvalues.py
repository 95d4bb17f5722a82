import matplotlib

matplotlib.use("Agg")

# Notebook 02's explorer (power iteration vs Lanczos), driven through every control's extremes, and
# the history helpers it is built on, checked against a matrix with a known spectrum.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.widgets.eigenvalues import (  # noqa: E402
    EigenExplorer,
    exact_extremes,
    lanczos_history,
    power_iteration_history,
    relative_errors,
)

OUTLIERS = [10.0, 8.0, 6.5, 5.0, 4.0, 3.2, 2.6, 2.1, 1.7, 1.4]


def spiked_matrix(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Q diag(lam) Q^T: ten separated outliers above a bulk in [-0.3, 1], like a trained net's Hessian."""
    gen = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - len(OUTLIERS), generator=gen, dtype=torch.float64) * 1.3 - 0.3
    lam = torch.cat([torch.tensor(OUTLIERS, dtype=torch.float64), bulk])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, lam


@pytest.fixture(scope="module")
def matrix():
    return spiked_matrix()


def _check_result(r: dict, A_norm: float, lam: torch.Tensor) -> None:
    k, power, lanczos = r["k"], r["power"], r["lanczos"]
    assert power.estimates.shape == (power.result.num_matvecs, k)
    assert lanczos.estimates.shape == (len(lanczos.products), k)
    assert r["power_errors"].shape == power.estimates.shape
    assert power.result.num_matvecs <= k * max(1, r["max_products"] // k)
    assert lanczos.result.num_matvecs <= max(k, r["max_products"])
    assert lanczos.products[-1] == lanczos.result.num_matvecs
    # segments tile the run in order, one per eigenvalue
    stops = [0] + [stop for _, stop in power.segments]
    assert [start for start, _ in power.segments] == stops[:-1] and stops[-1] == power.result.num_matvecs
    np.testing.assert_allclose(r["exact_power"], OUTLIERS[:k])
    np.testing.assert_allclose(r["exact_lanczos"], OUTLIERS[:k])
    # every estimate is within its residual of SOME eigenvalue (not necessarily the i-th at loose tol)
    spectrum = lam.numpy()
    for res in (power.result, lanczos.result):
        nearest = np.abs(res.values.numpy()[:, None] - spectrum[None, :]).min(axis=1)
        assert np.all(nearest <= res.residuals.numpy() + 1e-12)
        ok = res.converged.numpy()
        assert np.all(res.residuals.numpy()[ok] <= r["tol"] * A_norm * (1 + 1e-12))


def test_explorer_over_its_controls(matrix):
    A, lam = matrix
    explorer = EigenExplorer(A, k=3, max_products=200, tol=1e-4, products=(20, 1000, 20))
    explorer.show()
    _check_result(explorer.result, 10.0, lam)
    assert explorer.figure.axes[0].get_xlabel() == "number of Hessian-vector products"
    assert "relative error" in explorer.figure.axes[0].get_ylabel()

    for k in (1, 10):
        explorer.controls["k"].value = k
        r = explorer.result
        assert r["k"] == k
        _check_result(r, 10.0, lam)
        assert len(explorer.figure.axes[1].get_lines()) >= k

    # k = 10, budget extremes at tol = 1e-4
    explorer.controls["max_products"].value = explorer.controls["max_products"].min
    small = explorer.result
    _check_result(small, 10.0, lam)
    assert small["max_products"] == 20
    assert not bool(small["power"].result.converged.all())  # 2 products per eigenvalue cannot do
    explorer.controls["max_products"].value = explorer.controls["max_products"].max
    big = explorer.result
    _check_result(big, 10.0, lam)
    assert bool(big["lanczos"].result.converged.all()) and bool(big["power"].result.converged.all())
    # Lanczos needs far fewer products than power iteration for the same ten pairs
    assert big["lanczos"].result.num_matvecs * 3 < big["power"].result.num_matvecs

    # tolerance extremes: 1e-8 costs more products than 1e-1, and meets its bound
    explorer.controls["tol"].value = 10.0 ** explorer.controls["tol"].min
    tight = explorer.result
    assert tight["tol"] == pytest.approx(1e-8)
    _check_result(tight, 10.0, lam)
    assert bool(tight["lanczos"].result.converged.all()) and bool(tight["power"].result.converged.all())
    for method in ("power", "lanczos"):  # tight tol: the i-th estimate is within its residual of lambda_i
        res = tight[method].result
        assert np.all(np.abs(res.values.numpy() - tight[f"exact_{method}"]) <= res.residuals.numpy() + 1e-12)
    bound = 1e-8 * 10.0 / np.abs(tight["exact_lanczos"])  # |theta - lambda| <= r <= tol ||A||
    assert np.all(tight["lanczos_final"] <= bound)
    explorer.controls["tol"].value = 10.0 ** explorer.controls["tol"].max
    loose = explorer.result
    assert loose["tol"] == pytest.approx(1e-1)
    _check_result(loose, 10.0, lam)
    for method in ("power", "lanczos"):
        assert loose[method].result.num_matvecs < tight[method].result.num_matvecs
    assert explorer.figure.axes[1].get_xlabel() == "number of Hessian-vector products"


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


def test_explorer_rejects_bad_inputs(matrix):
    A, _ = matrix
    with pytest.raises(ValueError, match="square"):
        EigenExplorer(A[:, :5])
    with pytest.raises(ValueError, match="n >= 12"):
        EigenExplorer(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="products"):
        EigenExplorer(A, products=(5, 100, 10))


def test_explorer_shows_progress_of_both_solvers(matrix):
    A, _ = matrix
    explorer = EigenExplorer(A, k=2, max_products=40, tol=1e-4, products=(20, 200, 20))
    explorer.show()
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["k"].value = 3
    assert any("power iteration: products" in s and "<progress" in s for s in seen)
    assert any("Lanczos: runs stopped early" in s and "<progress" in s for s in seen)
    assert explorer.status.value == ""


def test_recording_operator_reports_each_product():
    from hesskit.progress import sink as progress_sink
    from hesskit.widgets.eigenvalues import RecordingOperator

    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    reports = []
    with progress_sink(lambda done, total, what: reports.append((done, total, what))):
        recorder = RecordingOperator(A, expected=3, what="steps")
        for _ in range(4):  # one more than expected: the bar stays full
            recorder @ torch.ones(5, dtype=torch.float64)
        RecordingOperator(A) @ torch.ones(5, dtype=torch.float64)  # no expected count: no reports
    assert reports == [(1, 3, "steps"), (2, 3, "steps"), (3, 3, "steps"), (3, 3, "steps")]
    assert recorder.num_matvecs == 4
