"""Notebook 01 (`01_trace_estimation.ipynb`): Hutchinson, Hutch++ and XTrace trace estimates, repeated over
many seeds.

Studies: independent `hk.trace` runs of one matrix, one seed each, with their spread, the
standard error of that spread and the coverage of the reported intervals (`trace_trials`,
`TraceTrials`); the variance of one Hutchinson sample (`hutchinson_variance`) and the norm that
Hutch++'s error follows (`deflated_tail_norm`); the fewest products each method accepts
(`MIN_PRODUCTS`, `too_few_products`). The notebook's explorer is
`hesskit.widgets.trace_estimation.TraceExplorer`.

References: Hutchinson, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines", Commun. Stat. Simul. Comput. 1989; Avron & Toledo, "Randomized
algorithms for estimating the trace of an implicit symmetric positive semi-definite matrix", JACM
2011; Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal stochastic trace estimation", SOSA 2021;
Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
estimation", SIAM J. Matrix Anal. Appl. 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import progress
from ..curvature.trace import MIN_MATVECS, trace

__all__ = ["TraceTrials", "trace_trials", "hutchinson_variance", "deflated_tail_norm", "MIN_PRODUCTS",
           "too_few_products"]

# the fewest products `hk.trace` accepts per method (the core's table; XTrace: or n, where it is exact)
MIN_PRODUCTS = {method: MIN_MATVECS[method] for method in ("hutchinson", "hutch++", "xtrace")}


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


def too_few_products(num_matvecs: int, method: str, n: int) -> str | None:
    """Why `hk.trace` refuses `num_matvecs` products with `method` on an n x n matrix, as a sentence
    for a student; None when it accepts them. XTrace with n or more products is exact, so its
    minimum is min(4, n)."""
    if method not in MIN_PRODUCTS:
        raise ValueError(f"method: expected one of {tuple(MIN_PRODUCTS)}, got {method!r}")
    low = min(MIN_PRODUCTS[method], n) if method == "xtrace" else MIN_PRODUCTS[method]
    if num_matvecs >= low:
        return None
    why = {"hutchinson": "one probe", "hutch++": "a sketch vector, its product and one remainder probe",
           "xtrace": "two probes, each used twice"}[method]
    return f"{method} needs at least {low} products ({why}); m = {num_matvecs} is too few"


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
