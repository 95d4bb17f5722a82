"""Notebook 01: Hutchinson and Hutch++ trace estimates, repeated over many seeds.

The explorer takes any symmetric matrix with a known trace (the notebook passes the dense
Hessian of a small digits MLP) and shows the spread of `hk.trace` estimates for a budget of
products, a method and a probe distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..curvature.trace import trace
from .explorer import Explorer
from .. import progress

__all__ = ["TraceExplorer", "TraceTrials", "trace_trials", "hutchinson_variance", "deflated_tail_norm",
           "geometric_counts"]


def hutchinson_variance(A: Tensor, distribution: str = "rademacher") -> float:
    """Variance of one Hutchinson sample z^T A z for a symmetric A (Hutchinson 1989; Avron &
    Toledo, JACM 2011): 2 (||A||_F^2 - sum_i A_ii^2) for Rademacher probes, 2 ||A||_F^2 for
    Gaussian probes. The estimate from m probes has variance this / m."""
    A = torch.as_tensor(A, dtype=torch.float64)
    frob2 = (A**2).sum().item()
    if distribution == "gaussian":
        return 2.0 * frob2
    if distribution == "rademacher":
        return 2.0 * (frob2 - (A.diagonal() ** 2).sum().item())
    raise ValueError(f"distribution: expected 'rademacher' or 'gaussian', got {distribution!r}")


def deflated_tail_norm(eigenvalues: Tensor | np.ndarray, k: int) -> float:
    """||A - A_k||_F, A_k the best rank-k approximation: the Frobenius norm of all but the k
    eigenvalues of largest magnitude. Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021) runs
    Hutchinson on what its sketch leaves over, so its error follows this norm, not ||A||_F."""
    mags = np.sort(np.abs(np.asarray(eigenvalues, dtype=float)))[::-1]
    return float(np.sqrt((mags[k:] ** 2).sum()))


def geometric_counts(low: int, high: int, num: int = 21) -> list[int]:
    """About `num` integers from low to high, evenly spaced on a log scale (for a log slider)."""
    if not 1 <= low <= high:
        raise ValueError(f"low, high: expected 1 <= low <= high, got {low}, {high}")
    return sorted({int(round(c)) for c in np.geomspace(low, high, num)})


@dataclass
class TraceTrials:
    """Independent estimates of one trace (one seed each) with their reported standard errors."""

    estimates: np.ndarray
    stderrs: np.ndarray
    exact: float
    num_matvecs: int
    method: str
    distribution: str

    @property
    def std(self) -> float:
        """Empirical standard deviation of the estimates (the error one run really makes)."""
        return float(self.estimates.std(ddof=1)) if len(self.estimates) > 1 else math.nan

    @property
    def std_stderr(self) -> float:
        """Standard error of `std` itself, so that two spreads can be compared with a tolerance.

        The sample variance s^2 of N i.i.d. values has Var(s^2) = (mu_4 - sigma^4 (N - 3)/(N - 1)) / N,
        mu_4 the fourth central moment (so skewed, heavy-tailed estimates get a wider tolerance than
        the normal-theory sigma / sqrt(2 (N - 1))); the delta method gives se(s) = sqrt(Var(s^2)) / (2 s).
        nan with fewer than 4 trials."""
        N = len(self.estimates)
        if N < 4:
            return math.nan
        centred = self.estimates - self.estimates.mean()
        var = float(centred.var(ddof=1))
        if var == 0.0:
            return 0.0
        var_of_var = max(float(np.mean(centred**4)) - var**2 * (N - 3) / (N - 1), 0.0) / N
        return math.sqrt(var_of_var) / (2 * math.sqrt(var))

    @property
    def mean_stderr(self) -> float:
        """Mean reported standard error (nan when a run has a single Hutchinson sample)."""
        return float(self.stderrs.mean())

    def coverage(self, z: float = 1.959964) -> float:
        """Fraction of the intervals value +- z * stderr that contain the exact trace (nan if no stderr)."""
        if np.isnan(self.stderrs).any():
            return math.nan
        return float(np.mean(np.abs(self.estimates - self.exact) <= z * self.stderrs))


def trace_trials(A: Tensor, num_matvecs: int, method: str = "hutchinson", distribution: str = "rademacher",
                 num_trials: int = 100, seed: int = 0, exact: float | None = None) -> TraceTrials:
    """Run `hk.trace` with seeds seed, seed+1, ... and collect the estimates (each run reports to
    `progress`, which shows a bar while an explorer renders)."""
    results = []
    for i in range(num_trials):
        results.append(trace(A, num_matvecs, method=method, distribution=distribution, seed=seed + i))
        progress.report(i + 1, num_trials, f"{method} runs")
    exact = float(torch.as_tensor(A).diagonal().sum()) if exact is None else exact
    return TraceTrials(np.array([r.value for r in results]), np.array([r.stderr for r in results]), exact,
                       num_matvecs, method, distribution)


class TraceExplorer(Explorer):
    """Number of products, method and probe distribution: a histogram of many independent
    `hk.trace` estimates of tr(A), against the exact trace.

    `max_products` caps the products per render (trials = max_products // m, between
    `min_trials` and `num_trials`), so that a slider move answers in about a second.
    """

    def __init__(self, matrix: Tensor, counts: tuple[int, int] = (3, 300), num_matvecs: int = 30,
                 num_trials: int = 200, min_trials: int = 40, max_products: int = 12_000, seed: int = 0,
                 name: str = "A"):
        import ipywidgets as widgets

        self.matrix = torch.as_tensor(matrix).detach()
        if self.matrix.dim() != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"matrix: expected a square matrix, got shape {tuple(self.matrix.shape)}")
        self.exact = float(self.matrix.double().diagonal().sum())
        self.num_trials, self.min_trials, self.max_products = num_trials, min_trials, max_products
        self.seed, self.name = seed, name
        self._variance = {d: hutchinson_variance(self.matrix, d) for d in ("rademacher", "gaussian")}
        self._cache: dict[tuple, TraceTrials] = {}
        options = geometric_counts(max(counts[0], 3), counts[1])
        start = min(options, key=lambda c: abs(c - num_matvecs))
        super().__init__({
            "num_matvecs": widgets.SelectionSlider(options=options, value=start, description="products m",
                                                   continuous_update=False),
            "method": widgets.ToggleButtons(options=["hutchinson", "hutch++"], value="hutchinson",
                                            description="method"),
            "distribution": widgets.ToggleButtons(options=["rademacher", "gaussian"], value="rademacher",
                                                  description="probes"),
        })

    def trials_for(self, num_matvecs: int) -> int:
        return int(min(self.num_trials, max(self.min_trials, self.max_products // num_matvecs)))

    def compute(self, num_matvecs: int, method: str, distribution: str) -> dict:
        key = (num_matvecs, method, distribution)
        if key not in self._cache:
            self._cache[key] = trace_trials(self.matrix, num_matvecs, method, distribution,
                                            self.trials_for(num_matvecs), self.seed, self.exact)
        trials = self._cache[key]
        return {
            "trials": trials,
            "estimates": trials.estimates,
            "exact": self.exact,
            "num_trials": len(trials.estimates),
            "std": trials.std,
            "mean_stderr": trials.mean_stderr,
            "coverage": trials.coverage(),
            "bias": float(trials.estimates.mean() - self.exact),
            # what Hutchinson with the same probes and the same m would give, from the formula
            "hutchinson_std": math.sqrt(self._variance[distribution] / num_matvecs),
            "num_matvecs": num_matvecs, "method": method, "distribution": distribution,
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(7.5, 4.6), layout="constrained")
        ax = fig.subplots()
        est, exact = result["estimates"], result["exact"]
        half = max(np.abs(est - exact).max(), 1e-12 * max(abs(exact), 1.0)) * 1.08
        num_bins = int(np.clip(round(2 * math.sqrt(len(est))), 10, 30))
        ax.hist(est, bins=np.linspace(exact - half, exact + half, num_bins + 1), color="tab:blue", alpha=0.75,
                edgecolor="white", label=f"{result['num_trials']} estimates (one seed each)")
        ax.axvline(exact, color="k", lw=2, label=f"exact trace = {exact:.4g}")
        grid = np.linspace(exact - half, exact + half, 300)
        width = 2 * half / num_bins * result["num_trials"]  # bin width x trials: density -> counts
        se = result["mean_stderr"]
        if np.isfinite(se) and se > 0:
            ax.plot(grid, width * np.exp(-0.5 * ((grid - exact) / se) ** 2) / (se * math.sqrt(2 * math.pi)),
                    color="tab:orange", lw=2, label="normal with the mean reported stderr")
        ax.set_xlim(exact - half, exact + half)
        ax.set_xlabel(f"estimate of tr({self.name})")
        ax.set_ylabel("number of trials")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper left", fontsize=8)
        se_text = f"{se:.3g}" if np.isfinite(se) else "n/a (1 Hutchinson sample)"
        cov = result["coverage"]
        cov_text = f"{100 * cov:.0f}%" if np.isfinite(cov) else "n/a"
        ax.set_title(
            f"{result['method']}, {result['distribution']} probes, m = {result['num_matvecs']} products\n"
            f"mean reported stderr = {se_text}, empirical std = {result['std']:.3g}, "
            f"95% CI coverage = {cov_text}\n"
            f"(Hutchinson theory at this m: std = {result['hutchinson_std']:.3g})", fontsize=10)
        return fig
