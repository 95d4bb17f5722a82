"""Notebook 02 (`02_top_eigenvalues.ipynb`): how fast power iteration (with deflation) and Lanczos
find the top eigenvalues.

Studies: the error of every wanted eigenvalue against the number of matrix-vector products
spent, for both of hesskit's eigensolvers on a symmetric matrix whose exact eigenvalues
`torch.linalg.eigvalsh` gives (`exact_extremes`, `relative_errors`, `History`):

- power iteration is recorded in ONE run by a wrapper operator that keeps every input vector
  (`RecordingOperator`, `power_iteration_history`); the Rayleigh quotient of the input is exactly
  the estimate the algorithm holds at that product;
- Lanczos is deterministic for a fixed seed, so a run stopped after b products is the state of the
  full run after b products: a sweep of budgets gives its history (`lanczos_history`).

The notebook's explorer is `hesskit.widgets.eigenvalues.EigenExplorer`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import progress
from ..curvature.eigen import eigenvalues, power_iteration
from ..curvature.results import EigenResult

__all__ = [
    "ERROR_FLOOR",
    "RecordingOperator",
    "History",
    "power_iteration_history",
    "lanczos_history",
    "exact_extremes",
    "relative_errors",
]

ERROR_FLOOR = 1e-16  # relative errors below float64 rounding are drawn here (log axes cannot show 0)


class RecordingOperator:
    """A symmetric matrix (or operator) that remembers every vector it is multiplied with.

    For each single-vector product A v it stores v and the Rayleigh quotient v^T A v / v^T v,
    which is what power iteration (Golub & Van Loan, Matrix Computations, 4th ed. 2013, sec. 8.2)
    takes as its eigenvalue estimate. (The solver that runs on it counts and reports the products:
    `progress=True`.)
    """

    def __init__(self, op: Any):
        self.op = op
        self.shape = tuple(op.shape)
        self.dtype = getattr(op, "dtype", torch.float64)
        self.device = getattr(op, "device", torch.device("cpu"))
        self.inputs: list[Tensor] = []
        self.rayleigh: list[float] = []

    def __matmul__(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            w = self.op @ v
        if v.dim() == 1:
            self.inputs.append(v.detach().clone())
            self.rayleigh.append(float(torch.dot(v, w) / torch.dot(v, v)))
        return w

    @property
    def num_matvecs(self) -> int:
        return len(self.inputs)


@dataclass
class History:
    """Estimates of k eigenvalues along a run: `estimates[j, i]` after `products[j]` products
    (nan where eigenvalue i has no estimate yet), and the solver's final result."""

    products: np.ndarray  # (m,) number of products spent
    estimates: np.ndarray  # (m, k)
    result: EigenResult
    segments: list[tuple[int, int]] | None = None  # power iteration: products [start, stop) per eigenvalue


def exact_extremes(matrix: Tensor, k: int, which: str = "largest") -> np.ndarray:
    """The k extreme eigenvalues of a dense symmetric matrix, in the order hesskit returns them."""
    lam = torch.linalg.eigvalsh(matrix.double()).cpu().numpy()
    order = {"largest": np.argsort(-lam), "smallest": np.argsort(lam), "magnitude": np.argsort(-np.abs(lam))}[which]
    return lam[order[:k]]


def relative_errors(estimates: np.ndarray, exact: np.ndarray, floor: float = ERROR_FLOOR) -> np.ndarray:
    """|theta_i - lambda_i| / |lambda_i| per column, floored at `floor` (nan stays nan)."""
    exact = np.asarray(exact, dtype=float)
    err = np.abs(np.asarray(estimates, dtype=float) - exact) / np.maximum(np.abs(exact), 1e-300)
    return np.where(np.isnan(err), np.nan, np.maximum(err, floor))


def power_iteration_history(op: Any, k: int, max_iters: int, tol: float, seed: int = 0,
                            progress: bool = False) -> History:
    """`hk.power_iteration` run once, with the estimate it holds after every product.

    Deflation (as in PyHessian: Yao et al., "PyHessian: Neural networks through the lens of the
    Hessian", IEEE BigData 2020) keeps every iterate of eigenvalue i orthogonal to the i - 1
    eigenvectors already found, while the iterates of eigenvalue i are not orthogonal to its own
    vector. That assigns each recorded product to its eigenvalue without re-implementing the
    solver's stopping rule; the last estimate of each eigenvalue is checked against the result.
    `progress=True` shows the solver's bar of products (in the status line of an explorer).
    """
    recorder = RecordingOperator(op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = power_iteration(recorder, k=k, max_iters=max_iters, tol=tol, seed=seed, progress=progress)
    inputs = torch.stack(recorder.inputs).double()
    overlaps = (inputs @ result.vectors.double()).abs().cpu().numpy()  # (T, k)
    orthogonal = overlaps < 1e-8
    # eigenvalue of product t = how many leading found vectors its input is orthogonal to
    owner = np.cumprod(orthogonal, axis=1).sum(axis=1)
    owner = np.minimum(owner, k - 1)
    if np.any(np.diff(owner) < 0):
        raise RuntimeError("power_iteration_history: products are not grouped by eigenvalue")
    rayleigh = np.asarray(recorder.rayleigh)
    T = len(rayleigh)
    estimates = np.full((T, k), np.nan)
    segments = []
    for i in range(k):
        where = np.flatnonzero(owner == i)
        if len(where) == 0:
            raise RuntimeError(f"power_iteration_history: found no products for eigenvalue {i + 1}")
        start, stop = int(where[0]), int(where[-1]) + 1
        segments.append((start, stop))
        estimates[start:stop, i] = rayleigh[start:stop]
        estimates[stop:, i] = rayleigh[stop - 1]
        final = float(result.values[i])
        if abs(rayleigh[stop - 1] - final) > 1e-10 * max(abs(final), 1e-30):
            raise RuntimeError(f"power_iteration_history: eigenvalue {i + 1} does not match the solver's result")
    return History(products=np.arange(1, T + 1), estimates=estimates, result=result, segments=segments)


def lanczos_history(
    op: Any, k: int, which: str, tol: float, max_matvecs: int, seed: int = 0, num_points: int = 60
) -> History:
    """`hk.eigenvalues` (thick-restart Lanczos) after b products, for budgets b up to where it stops.

    The Ritz values come from the Krylov subspace span{v, Av, ..., A^(b-1) v} (Lanczos 1950;
    restarted as in Wu & Simon, SIAM J. Matrix Anal. Appl. 2000). A run with budget b is the full
    run stopped after b products, so at most `num_points` runs trace the whole history.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = eigenvalues(op, k=k, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed)
        last = final.num_matvecs
        if last - k + 1 <= num_points:
            budgets = np.arange(k, last + 1)
        else:
            budgets = np.unique(np.linspace(k, last, num_points).round().astype(int))
        rows = []
        for j, b in enumerate(budgets[:-1]):
            values = eigenvalues(op, k=k, which=which, tol=tol, max_matvecs=int(b), seed=seed).values
            rows.append(values.double().cpu().numpy())
            progress.report(j + 1, len(budgets) - 1, "Lanczos: runs stopped early")
    rows.append(final.values.double().cpu().numpy())
    return History(products=budgets, estimates=np.stack(rows), result=final)
