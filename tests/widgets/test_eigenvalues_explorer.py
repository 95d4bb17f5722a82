import matplotlib

matplotlib.use("Agg")

# Notebook 02's explorer (power iteration vs Lanczos), driven through every control's extremes on a
# matrix with a known spectrum, and the progress of both solvers in its status line. The history
# helpers it is built on: tests/experiments/test_eigenvalues.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hesskit.widgets.eigenvalues import EigenExplorer  # noqa: E402
from fixtures.eigenvalues import OUTLIERS, matrix  # noqa: E402,F401 (pytest fixtures)


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
    assert any("power iteration" in s and "<progress" in s for s in seen)
    assert any("Lanczos: runs stopped early" in s and "<progress" in s for s in seen)
    assert explorer.status.value == ""
