"""Notebook 03 (`03_spectral_density.ipynb`): the Hessian's spectral density by stochastic Lanczos
quadrature, against the exact one.

SLQ (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019) estimates the eigenvalue density
phi(t) = (1/n) sum_i delta(t - lambda_i) from a few Lanczos runs; on a model small enough for
`torch.linalg.eigvalsh(op.dense())` we can smooth both with the same Gaussian and compare.
Helpers: the exact smoothed density (`exact_density`) on a grid that holds its mass
(`density_grid`), the trapezoidal rule (`integrate`), and the number of outliers above the bulk
(`count_outliers`). The notebook's explorer is `hesskit.widgets.spectral_density.DensityExplorer`.
"""

from __future__ import annotations

import numpy as np

from ..curvature.results import smoothed_density

__all__ = ["exact_density", "density_grid", "count_outliers", "integrate"]


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
