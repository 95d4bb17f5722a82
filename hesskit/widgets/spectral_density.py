"""Notebook 03: the Hessian's spectral density by stochastic Lanczos quadrature, against the exact one.

SLQ (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019) estimates the eigenvalue density
phi(t) = (1/n) sum_i delta(t - lambda_i) from a few Lanczos runs; on a model small enough for
`torch.linalg.eigvalsh(op.dense())` we can smooth both with the same Gaussian and compare.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from ..curvature.density import spectral_density
from ..curvature.results import smoothed_density
from .explorer import Explorer
from .. import progress

__all__ = ["DensityExplorer", "exact_density", "density_grid", "count_outliers", "integrate"]


def exact_density(eigenvalues: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The exact spectral density (1/n) sum_i delta(t - lambda_i), smoothed by a Gaussian of width sigma."""
    eigenvalues = np.asarray(eigenvalues, dtype=float).reshape(-1)
    return smoothed_density(eigenvalues, np.full(len(eigenvalues), 1.0 / len(eigenvalues)), grid, sigma)


def density_grid(lo: float, hi: float, sigma: float, num_points: int = 2000) -> np.ndarray:
    """An evaluation grid that covers [lo, hi] plus 5 sigma on each side (so densities integrate to ~1)."""
    return np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)


def integrate(values: np.ndarray, grid: np.ndarray) -> float:
    """The trapezoidal rule (np.trapezoid needs numpy >= 2, where np.trapz is deprecated)."""
    values, grid = np.asarray(values, dtype=float), np.asarray(grid, dtype=float)
    return float(((values[1:] + values[:-1]) * np.diff(grid)).sum() / 2)


class _ReportingMatrix:
    """A dense symmetric matrix whose products report progress (one unit per product), so that an
    explorer's status line shows how far SLQ has got; `hk.spectral_density` sees the same products
    (and draws the same probes) as on the matrix itself."""

    def __init__(self, H: torch.Tensor, total: int, what: str):
        self.H, self.shape, self.dtype, self.device = H, H.shape, H.dtype, H.device
        self.total, self.what, self.done = total, what, 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.H @ v
        self.done += 1 if v.dim() == 1 else v.shape[1]
        progress.report(min(self.done, self.total), self.total, self.what)
        return out


def count_outliers(eigenvalues: np.ndarray, min_ratio: float = 2.0, max_count: int = 50) -> int:
    """How many top eigenvalues stand apart from the rest: the position of the largest ratio
    lambda_k / lambda_{k+1} among the top `max_count` positive eigenvalues, if that ratio is at
    least `min_ratio`, else 0. A crude rule for the bulk-plus-outliers picture of Sagun et al.
    (2017) and Papyan (2019, 2020), not a statistical test. The default threshold 2 separates the
    gap below the nine outliers of notebook 03's trained digits MLP (a factor of about 3) from the
    neighbouring ratios of a smoothly decaying spectrum (well below 2).
    """
    top = np.sort(np.asarray(eigenvalues, dtype=float).reshape(-1))[::-1]
    top = top[top > 0][: max_count + 1]
    if len(top) < 2:
        return 0
    ratios = top[:-1] / top[1:]
    k = int(np.argmax(ratios))
    return k + 1 if ratios[k] >= min_ratio else 0


class DensityExplorer(Explorer):
    """Runs, Lanczos steps and smoothing width: the SLQ density (log scale) against the exact one.

    `hessians` maps a label (e.g. "trained", "initialisation") to a dense symmetric matrix; their
    exact eigenvalues are computed once here (or passed in `eigenvalues`). SLQ runs on the dense
    matrix, so a slider move costs runs x steps cheap products; on a real network one passes the
    operator instead (the same products, each a double backward pass).
    """


    def __init__(self, hessians: Mapping[str, torch.Tensor], num_runs: int = 10, num_steps: int = 40,
                 sigma: float = 0.01, runs: tuple[int, int] = (1, 20), steps: tuple[int, int] = (5, 100),
                 seed: int = 0, eigenvalues: Mapping[str, torch.Tensor] | None = None):
        import ipywidgets as widgets

        if not hessians:
            raise ValueError("hessians: expected at least one labelled matrix")
        self.hessians = {name: H.detach() for name, H in hessians.items()}
        for name, H in self.hessians.items():
            if H.dim() != 2 or H.shape[0] != H.shape[1]:
                raise ValueError(f"hessians[{name!r}]: expected a square matrix, got shape {tuple(H.shape)}")
        given = dict(eigenvalues or {})
        self.eigenvalues = {
            name: np.sort(np.asarray(given[name], dtype=float)) if name in given
            else torch.linalg.eigvalsh(H.double()).numpy()
            for name, H in self.hessians.items()
        }
        self.seed = seed
        self._slq_cache: dict[tuple[str, int, int], tuple] = {}  # a sigma move reuses the last SLQ run
        controls = {}
        if len(self.hessians) > 1:
            controls["weights"] = widgets.ToggleButtons(options=list(self.hessians), description="weights")
        controls["num_runs"] = widgets.IntSlider(value=num_runs, min=runs[0], max=runs[1], description="runs",
                                                 continuous_update=False)
        controls["num_steps"] = widgets.IntSlider(value=num_steps, min=steps[0], max=steps[1],
                                                  description="Lanczos steps", continuous_update=False,
                                                  style={"description_width": "initial"})
        controls["sigma"] = widgets.FloatLogSlider(value=sigma, base=10, min=-3, max=-1, step=0.125,
                                                   description="σ / span", readout_format=".4f",
                                                   continuous_update=False)
        super().__init__(controls)

    def compute(self, num_runs: int, num_steps: int, sigma: float, weights: str | None = None) -> dict:
        name = weights if weights is not None else next(iter(self.hessians))
        H, eigs = self.hessians[name], self.eigenvalues[name]
        n = len(eigs)
        span = float(eigs[-1] - eigs[0])
        width = sigma * span
        key = (name, num_runs, min(num_steps, n))
        if key not in self._slq_cache:
            start = time.perf_counter()
            total = num_runs * min(num_steps, n)
            products = _ReportingMatrix(H, total, "SLQ: Hessian-vector products")  # shown in the status line
            slq = spectral_density(products, num_runs=num_runs, num_steps=min(num_steps, n), seed=self.seed)
            progress.report(total, total, "SLQ: Hessian-vector products")  # a run that stopped early used fewer
            self._slq_cache = {key: (slq, time.perf_counter() - start)}
        slq, seconds = self._slq_cache[key]
        grid = density_grid(float(eigs[0]), float(eigs[-1]), width)
        exact = exact_density(eigs, grid, width)
        estimate = slq.density(grid, width)
        l1 = integrate(np.abs(estimate - exact), grid)
        frob, frob_err = slq.estimate_trace(lambda t: t**2)
        tr, tr_err = slq.estimate_trace(lambda t: t)
        return {"name": name, "n": n, "eigenvalues": eigs, "span": span, "sigma": width, "grid": grid,
                "exact": exact, "estimate": estimate, "l1": l1, "nodes": slq.nodes, "weights": slq.weights,
                "num_runs": num_runs, "num_steps": min(num_steps, n), "num_matvecs": slq.num_matvecs,
                "seconds": seconds, "frobenius": (frob, frob_err, float((eigs**2).sum())),
                "trace": (tr, tr_err, float(eigs.sum())), "outliers": count_outliers(eigs)}

    def draw(self, result: dict):
        from matplotlib.figure import Figure
        from matplotlib.transforms import blended_transform_factory

        fig = Figure(figsize=(11, 4.4))
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
        fig.subplots_adjust(left=0.07, right=0.99, bottom=0.12, top=0.86, wspace=0.22)
        grid, exact, estimate = result["grid"], result["exact"], result["estimate"]
        left.plot(grid, exact, color="k", lw=2.5, alpha=0.35, label="exact eigenvalues, same smoothing")
        left.plot(grid, estimate, color="C1", lw=1.3, label="SLQ estimate")
        left.set_yscale("log")
        top = max(exact.max(), estimate.max())
        left.set_ylim(top * 1e-7, top * 3)
        left.set_xlabel("eigenvalue λ of the Hessian")
        left.set_ylabel("smoothed spectral density φσ(λ)  (log scale)")
        frob, frob_err, frob_exact = result["frobenius"]
        error_bar = f"± {frob_err:.2g}" if result["num_runs"] > 1 else "(1 run: no error bar)"
        left.set_title(f"{result['name']}: {result['num_runs']} runs x {result['num_steps']} steps = "
                       f"{result['num_matvecs']} products, σ = {result['sigma']:.2g}\n"
                       f"L1 distance to exact {result['l1']:.3f};  ‖H‖F² SLQ {frob:.3g} {error_bar}, "
                       f"exact {frob_exact:.3g}", fontsize=10)
        left.legend(loc="upper right", fontsize=9)

        nodes, weights = result["nodes"].reshape(-1), result["weights"].reshape(-1)
        keep = weights > 0
        right.scatter(nodes[keep], weights[keep], s=10, color="C1", alpha=0.6, label="quadrature nodes (all runs)")
        right.axhline(1 / result["n"], color="C0", ls="--", lw=1, label="1/n = mass of one eigenvalue")
        rug = blended_transform_factory(right.transData, right.transAxes)
        right.plot(result["eigenvalues"], np.full(result["n"], 0.02), "|", color="k", ms=8, alpha=0.4,
                   transform=rug, label="exact eigenvalues")
        right.set_yscale("log")
        right.set_ylim(max(weights[keep].min() * 0.3, 1e-12), 2)
        right.set_xlabel("Ritz value θ (quadrature node)")
        right.set_ylabel("weight (first component of T's eigenvector)²")
        right.set_title(f"Gauss quadrature nodes and weights; n = {result['n']}, "
                        f"{result['outliers']} outliers", fontsize=10)
        right.legend(loc="upper center", fontsize=8)
        return fig
