"""Notebook 01 (`01_trace_estimation.ipynb`): the trace-estimation explorer.

The explorer takes any symmetric matrix with a known trace (the notebook passes the dense
Hessian of a small digits MLP) and shows the spread of `hk.trace` estimates for a budget of
products, a method (Hutchinson, Hutch++ or XTrace) and a probe distribution; a budget the method
cannot run with (XTrace below 4 products) shows why instead of a histogram. What it computes
lives in `hesskit.experiments.trace_estimation`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..experiments.trace_estimation import (MIN_PRODUCTS, TraceTrials, hutchinson_variance, too_few_products,
                                           trace_trials)
from .explorer import Explorer

__all__ = ["TraceExplorer", "geometric_counts"]


def geometric_counts(low: int, high: int, num: int = 21) -> list[int]:
    """About `num` integers from low to high, evenly spaced on a log scale (for a log slider)."""
    if not 1 <= low <= high:
        raise ValueError(f"low, high: expected 1 <= low <= high, got {low}, {high}")
    return sorted({int(round(c)) for c in np.geomspace(low, high, num)})


class TraceExplorer(Explorer):
    """Number of products, method and probe distribution: a histogram of many independent
    `hk.trace` estimates of tr(A), against the exact trace. A method that needs more products than
    the slider's (XTrace at m = 3) draws a message saying so.

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
            "method": widgets.ToggleButtons(options=list(MIN_PRODUCTS), value="hutchinson",
                                            description="method"),
            "distribution": widgets.ToggleButtons(options=["rademacher", "gaussian"], value="rademacher",
                                                  description="probes"),
        })

    def trials_for(self, num_matvecs: int) -> int:
        return int(min(self.num_trials, max(self.min_trials, self.max_products // num_matvecs)))

    def compute(self, num_matvecs: int, method: str, distribution: str) -> dict:
        message = too_few_products(num_matvecs, method, self.matrix.shape[0])
        if message is not None:  # nothing to run: draw says why
            return {"message": message, "num_matvecs": num_matvecs, "method": method, "distribution": distribution,
                    "exact": self.exact, "num_trials": 0}
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
        if "message" in result:
            return _draw_message(fig, ax, result, self.name)
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
        if result["method"] == "xtrace" and np.isfinite(se):
            se_text += " (jackknife)"
        cov = result["coverage"]
        cov_text = f"{100 * cov:.0f}%" if np.isfinite(cov) else "n/a"
        ax.set_title(
            f"{result['method']}, {result['distribution']} probes, m = {result['num_matvecs']} products\n"
            f"mean reported stderr = {se_text}, empirical std = {result['std']:.3g}, "
            f"95% CI coverage = {cov_text}\n"
            f"(Hutchinson theory at this m: std = {result['hutchinson_std']:.3g})", fontsize=10)
        return fig


def _draw_message(fig, ax, result: dict, name: str):
    """The explorer's figure when the method cannot run with the slider's budget: the reason, and
    what to change."""
    ax.set_axis_off()
    ax.text(0.5, 0.55, result["message"], ha="center", va="center", fontsize=12, wrap=True, color="tab:red",
            transform=ax.transAxes)
    ax.text(0.5, 0.35, "move the slider to more products, or pick another method", ha="center", va="center",
            fontsize=10, transform=ax.transAxes)
    ax.set_title(f"{result['method']}, {result['distribution']} probes, m = {result['num_matvecs']} products: "
                 f"no estimate of tr({name})", fontsize=10)
    return fig
