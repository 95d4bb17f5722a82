"""Notebook 02: how fast power iteration (with deflation) and Lanczos find the top eigenvalues.

The explorer runs both of hesskit's eigensolvers on a symmetric matrix (a dense Hessian, whose
exact eigenvalues `torch.linalg.eigvalsh` gives) and plots the relative error of every wanted
eigenvalue against the number of matrix-vector products spent:

- power iteration is recorded in ONE run by a wrapper operator that keeps every input vector;
  the Rayleigh quotient of the input is exactly the estimate the algorithm holds at that product;
- Lanczos is deterministic for a fixed seed, so a run stopped after b products is the state of the
  full run after b products: a sweep of budgets gives its history.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..curvature.eigen import eigenvalues, power_iteration
from ..curvature.results import EigenResult
from .explorer import Explorer
from .. import progress

__all__ = [
    "EigenExplorer",
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
    takes as its eigenvalue estimate. With `expected` products in view, every product is reported
    to `progress` (a bar while an explorer renders).
    """

    def __init__(self, op: Any, expected: int | None = None, what: str = "products"):
        self.op = op
        self.expected, self.what = expected, what
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
            if self.expected:
                progress.report(min(len(self.inputs), self.expected), self.expected, self.what)
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


def power_iteration_history(op: Any, k: int, max_iters: int, tol: float, seed: int = 0) -> History:
    """`hk.power_iteration` run once, with the estimate it holds after every product.

    Deflation (as in PyHessian: Yao et al., "PyHessian: Neural networks through the lens of the
    Hessian", IEEE BigData 2020) keeps every iterate of eigenvalue i orthogonal to the i - 1
    eigenvectors already found, while the iterates of eigenvalue i are not orthogonal to its own
    vector. That assigns each recorded product to its eigenvalue without re-implementing the
    solver's stopping rule; the last estimate of each eigenvalue is checked against the result.
    """
    recorder = RecordingOperator(op, expected=k * max_iters, what="power iteration: products")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = power_iteration(recorder, k=k, max_iters=max_iters, tol=tol, seed=seed)
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


class EigenExplorer(Explorer):
    """k, a budget of products and a tolerance: error vs products for power iteration and Lanczos.

    `matrix` is a dense symmetric matrix (e.g. `op.dense()` of a small model); its products give
    the same numbers as the Hessian-vector products they stand for, only faster. Power iteration
    gets `max_products // k` products per eigenvalue (its `max_iters`), Lanczos `max_products` in all.
    """


    def __init__(self, matrix: Tensor, k: int = 5, max_products: int = 1000, tol: float = 1e-6,
                 products: tuple[int, int, int] = (100, 2000, 100), seed: int = 0, which: str = "largest"):
        import ipywidgets as widgets

        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix: expected a square matrix, got shape {tuple(matrix.shape)}")
        if matrix.shape[0] < 12:
            raise ValueError(f"matrix: expected n >= 12 (k goes up to 10), got n = {matrix.shape[0]}")
        if len(products) != 3 or not 10 <= products[0] <= products[1] or products[2] < 1:
            raise ValueError(f"products: expected (min, max, step) with 10 <= min <= max and step >= 1, got {products}")
        self.matrix = matrix.detach().double()
        self.seed = seed
        self.which = which
        lam = torch.linalg.eigvalsh(self.matrix).cpu().numpy()
        self.eigenvalues = lam
        self.norm = float(np.abs(lam).max())
        super().__init__({
            "k": widgets.IntSlider(value=k, min=1, max=10, description="k", continuous_update=False),
            "max_products": widgets.IntSlider(value=max_products, min=products[0], max=products[1], step=products[2],
                                              description="max products", continuous_update=False),
            "tol": widgets.FloatLogSlider(value=tol, base=10, min=-8, max=-1, step=0.5, description="tol",
                                          readout_format=".0e", continuous_update=False),
        })

    def _exact(self, k: int, which: str) -> np.ndarray:
        lam = self.eigenvalues
        order = {"largest": np.argsort(-lam), "smallest": np.argsort(lam), "magnitude": np.argsort(-np.abs(lam))}[which]
        return lam[order[:k]]

    def compute(self, k: int, max_products: int, tol: float) -> dict:
        power = power_iteration_history(self.matrix, k, max_iters=max(1, max_products // k), tol=tol, seed=self.seed)
        lanczos = lanczos_history(self.matrix, k, self.which, tol, max_matvecs=max(k, max_products), seed=self.seed)
        exact_power, exact_lanczos = self._exact(k, "magnitude"), self._exact(k, self.which)
        lam_mag = self.eigenvalues[np.argsort(-np.abs(self.eigenvalues))]
        return {
            "k": k, "max_products": max_products, "tol": tol, "norm": self.norm,
            "power": power, "lanczos": lanczos,
            "exact_power": exact_power, "exact_lanczos": exact_lanczos,
            "power_errors": relative_errors(power.estimates, exact_power),
            "lanczos_errors": relative_errors(lanczos.estimates, exact_lanczos),
            "power_final": relative_errors(power.result.values.numpy(), exact_power),
            "lanczos_final": relative_errors(lanczos.result.values.numpy(), exact_lanczos),
            "power_rate": float(abs(lam_mag[1] / lam_mag[0]) ** 2),  # Rayleigh-quotient error per product
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        k, tol = result["k"], result["tol"]
        fig = Figure(figsize=(11, 4.6), layout="constrained")
        ax_p, ax_l = fig.subplots(1, 2, sharey=True)
        colors = [f"C{i}" for i in range(k)]
        power, lanczos = result["power"], result["lanczos"]
        for i, (start, stop) in enumerate(power.segments):
            x = power.products[start:stop]
            ax_p.semilogy(x, result["power_errors"][start:stop, i], color=colors[i], lw=1.3)
            done = bool(power.result.converged[i])
            ax_p.plot(x[-1], result["power_errors"][stop - 1, i], "o", color=colors[i],
                      mfc=colors[i] if done else "white", ms=6)
        # the rate theory predicts for eigenvalue 1: error ~ C |lambda_2 / lambda_1|^(2t), anchored mid-run
        start, stop = power.segments[0]
        if stop - start >= 4:
            mid = (start + stop) // 2
            t = power.products[start:stop]
            ref = result["power_errors"][mid, 0] * result["power_rate"] ** (t - power.products[mid])
            ax_p.semilogy(t, ref, ":", color="k", lw=1.2, label=r"theory for $\lambda_1$: $|\lambda_2/\lambda_1|^{2t}$")
        for i in range(k):
            done = bool(lanczos.result.converged[i])
            ax_l.semilogy(lanczos.products, result["lanczos_errors"][:, i], color=colors[i], lw=1.3,
                          label=rf"$\lambda_{{{i + 1}}} = {result['exact_lanczos'][i]:.4g}$")
            ax_l.plot(lanczos.products[-1], result["lanczos_errors"][-1, i], "o", color=colors[i],
                      mfc=colors[i] if done else "white", ms=6)
        ax_p.axvline(lanczos.result.num_matvecs, color="0.5", ls="-.", lw=1, label="where Lanczos stopped")
        for ax in (ax_p, ax_l):
            ax.axhline(tol, color="k", ls="--", lw=1, label=f"tol = {tol:.0e}")
            ax.set_xlabel("number of Hessian-vector products")
            ax.set_ylim(ERROR_FLOOR / 3, 10)
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_p.set_ylabel(r"relative error $|\theta_i - \lambda_i| \,/\, |\lambda_i|$")
        nc_p, nc_l = int(power.result.converged.sum()), int(lanczos.result.converged.sum())
        ax_p.set_title(f"power iteration + deflation (hk.power_iteration)\n"
                       f"{power.result.num_matvecs} products, {nc_p}/{k} converged", fontsize=10)
        ax_l.set_title(f"Lanczos (hk.eigenvalues)\n{lanczos.result.num_matvecs} products, {nc_l}/{k} converged",
                       fontsize=10)
        ax_l.plot([], [], "o", color="0.3", label="converged (filled) / not (open)")
        handles, labels = ax_l.get_legend_handles_labels()
        extra = [(h, lab) for h, lab in zip(*ax_p.get_legend_handles_labels()) if lab not in labels]
        ax_l.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], loc="upper left",
                    bbox_to_anchor=(1.02, 1.0), fontsize=8, title="exact eigenvalues", title_fontsize=8)
        fig.suptitle(f"error of the top-{k} eigenvalues vs cost (max {result['max_products']} products; "
                     f"power iteration gets {max(1, result['max_products'] // k)} per eigenvalue)", fontsize=11)
        return fig
