"""Result objects: every estimate carries its error, its cost in products, its seed and its time."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

__all__ = ["TraceResult", "BlockTraceResult", "DiagonalResult", "EigenResult", "SpectralDensityResult", "smoothed_density"]


def _t_quantile(level: float, num_samples: int) -> float:
    """Two-sided Student-t quantile for a mean of `num_samples` samples (nan with fewer than 2)."""
    from scipy.stats import t

    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level}")
    return float(t.ppf(0.5 + level / 2, df=num_samples - 1)) if num_samples > 1 else math.nan


@dataclass(frozen=True, kw_only=True)
class _Cost:
    """What every estimate carries besides its value: products used, seed, time, and what it touched
    (`params`: the parameter names of the operator's rows, in order; None for a plain matrix)."""

    num_matvecs: int
    seed: int | None
    wall_time: float
    matvec_time: float
    params: tuple[str, ...] | None = None

    @property
    def overhead_time(self) -> float:
        """Seconds spent outside curvature products (the estimator's own arithmetic)."""
        return max(self.wall_time - self.matvec_time, 0.0)


@dataclass(frozen=True, kw_only=True)
class TraceResult(_Cost):
    """A trace estimate. `stderr` is the standard error of `value`, computed from `num_samples`
    independent terms (all probes for Hutchinson, the residual probes for Hutch++, the jackknife's
    groups of probes for XTrace; nan with fewer than two; 0 when the estimate is exact: `method`
    "exact", or an XTrace sketch that spans the operator's range)."""

    value: float
    stderr: float
    num_samples: int
    method: str
    distribution: str

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Student-t interval on `num_samples - 1` degrees of freedom (nominal coverage for
        normal samples; few probes of a skewed quadratic form can still cover less)."""
        half = _t_quantile(level, self.num_samples) * self.stderr
        return self.value - half, self.value + half


@dataclass(frozen=True, kw_only=True)
class BlockTraceResult(_Cost):
    """Traces of several diagonal blocks (layers, parameters) from the same products.

    `values[block]` is the estimate of tr(A_bb), `stderr[block]` its standard error and
    `samples[block]` the `num_samples` random terms it is the mean of (one per probe for
    Hutchinson, one per leave-one-out estimate for XTrace); `sizes[block]` is the block's
    dimension. The blocks' estimates add up to the estimate of the trace of the rows they cover."""

    values: dict[str, float]
    stderr: dict[str, float]
    samples: dict[str, np.ndarray]
    sizes: dict[str, int]
    num_samples: int
    method: str
    distribution: str

    def __getitem__(self, block: str) -> float:
        return self.values[block]

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True, kw_only=True)
class DiagonalResult(_Cost):
    """A diagonal estimate with a per-entry standard error; `method` is "xdiag", "hutchinson" or
    "exact" (or the estimator's name, e.g. "model labels" for Gauss-Newton-Bartlett). With
    `blocks` (block name -> row indices, from `hk.diagonal(blocks=...)`), `block(name)` gives a
    block's entries."""

    value: Tensor
    stderr: Tensor
    distribution: str
    method: str = "hutchinson"
    blocks: dict[str, Tensor] | None = None
    block_shapes: dict[str, tuple[int, ...] | None] | None = None

    def block(self, name: str) -> tuple[Tensor, Tensor]:
        """(value, stderr) of block `name`'s entries, shaped like its parameter when the block is
        exactly one parameter (1-D otherwise)."""
        if self.blocks is None:
            raise ValueError("block: this estimate has no blocks; pass blocks= to hk.diagonal")
        if name not in self.blocks:
            raise KeyError(f"block: {name!r} is not one of {list(self.blocks)}")
        idx = self.blocks[name].to(self.value.device)
        shape = (self.block_shapes or {}).get(name) or (len(idx),)
        return self.value[idx].reshape(shape), self.stderr[idx].reshape(shape)


@dataclass(frozen=True, kw_only=True)
class EigenResult(_Cost):
    """Eigenpairs. `residuals[i] = ||A v_i - lambda_i v_i||`, which bounds the eigenvalue error;
    `converged[i]` says whether it met the tolerance."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: Tensor
    which: str
    method: str


@dataclass(frozen=True, kw_only=True)
class SpectralDensityResult(_Cost):
    """Stochastic Lanczos quadrature: per run, Gauss quadrature nodes and weights (summing to 1).

    For any function f, mean over runs of sum(weights * f(nodes)) estimates tr f(A) / n.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int

    def estimate_trace(self, f: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
        """Estimate tr f(A) with its standard error over runs."""
        per_run = self.dim * (self.weights * f(self.nodes)).sum(axis=1)
        stderr = per_run.std(ddof=1) / math.sqrt(len(per_run)) if len(per_run) > 1 else math.nan
        return float(per_run.mean()), float(stderr)

    def default_sigma(self) -> float:
        """Smoothing width: 1% of the spectrum's span (at least 1e-12)."""
        span = float(self.nodes.max() - self.nodes.min())
        return max(0.01 * span, 1e-12)

    def density(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """The spectral density smoothed by a Gaussian of width `sigma`, on `grid` (integrates to 1)."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        return smoothed_density(self.nodes, self.weights / self.nodes.shape[0], grid, sigma)

    def plot(self, ax=None, sigma: float | None = None, num_points: int = 1000, log_scale: bool = True):
        """Plot the smoothed density (log scale shows the outliers beside the bulk)."""
        import matplotlib.pyplot as plt

        sigma = self.default_sigma() if sigma is None else sigma
        lo, hi = self.nodes.min() - 3 * sigma, self.nodes.max() + 3 * sigma
        grid = np.linspace(lo, hi, num_points)
        values = self.density(grid, sigma)
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(grid, values)
        if log_scale:
            ax.set_yscale("log")
            ax.set_ylim(max(values.max() * 1e-8, 1e-300), values.max() * 2)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"spectral density (SLQ, {self.nodes.shape[0]} runs x {self.nodes.shape[1]} steps, sigma={sigma:.3g})")
        return ax


def smoothed_density(points: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """sum_i weights_i N(grid; points_i, sigma^2): point masses smoothed by a Gaussian of width sigma.

    With SLQ nodes and weights (averaged over runs) this is the smoothed density estimate of
    Lin, Saad & Yang (2016) and Ghorbani et al. (2019); with the eigenvalues and weights 1/n it is
    the exact spectral density smoothed the same way.
    """
    if sigma <= 0:
        raise ValueError(f"sigma: expected a positive width, got {sigma}")
    points = np.asarray(points, dtype=float).reshape(-1)
    weights = np.asarray(weights, dtype=float).reshape(-1)
    grid = np.asarray(grid, dtype=float)
    out = np.zeros_like(grid)
    for start in range(0, len(points), 2048):  # chunks keep the (grid x points) table small
        z = (grid[:, None] - points[None, start : start + 2048]) / sigma
        out += (np.exp(-0.5 * z**2) * weights[None, start : start + 2048]).sum(axis=1)
    return out / (sigma * math.sqrt(2 * math.pi))
