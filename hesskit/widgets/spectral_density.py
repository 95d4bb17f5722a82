"""Notebook 03 (`03_spectral_density.ipynb`): the spectral-density explorer, SLQ's estimate of the
Hessian's eigenvalue density (log scale) against the exact one, and its quadrature nodes. What
it computes lives in `hesskit.experiments.spectral_density` and `hk.spectral_density`."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from .. import progress
from ..curvature.density import spectral_density
from ..experiments.spectral_density import count_outliers, density_grid, exact_density, integrate
from .explorer import Explorer

__all__ = ["DensityExplorer"]


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
            # a bar only in the status line while rendering (or a test's recorder): notebook 03 also
            # calls compute() directly, where a tqdm bar would add an output
            slq = spectral_density(H, num_runs=num_runs, num_steps=min(num_steps, n), seed=self.seed,
                                   progress=progress.active())
            progress.report(total, total, "spectral density")  # a run that stopped early used fewer
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
