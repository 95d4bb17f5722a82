"""Notebook 05 (`05_batch_size_and_learning_rate.ipynb`): the batch-size explorer, the spread of
lambda_max(H_B) across mini-batches, the whole curve lambda_max(B) and the overlap of the top
eigenvectors. What it computes lives in `hesskit.experiments.batch_size`."""

from __future__ import annotations

import numpy as np

from ..experiments.batch_size import MinibatchSharpness
from .explorer import Explorer

__all__ = ["BatchSizeExplorer"]


class BatchSizeExplorer(Explorer):
    """Batch-size slider over a precomputed `MinibatchSharpness`: the spread of lambda_max(H_B)
    across mini-batches, the whole curve lambda_max(B), and the eigenvector overlap with H's."""


    def __init__(self, curve: MinibatchSharpness, batch_size: int | None = None):
        import ipywidgets as widgets

        self.curve = curve
        sizes = [int(b) for b in curve.batch_sizes]
        options = [(f"{b} (full)" if b == curve.num_samples else str(b), b) for b in sizes]
        value = sizes[0] if batch_size is None else int(batch_size)
        if value not in sizes:
            raise ValueError(f"batch_size: expected one of {sizes}, got {batch_size}")
        super().__init__({
            "batch_size": widgets.SelectionSlider(options=options, value=value, description="batch size B",
                                                  continuous_update=False, style={"description_width": "initial"},
                                                  layout={"width": "420px"}),
        })

    def compute(self, batch_size: int) -> dict:
        c = self.curve
        s = int(np.flatnonzero(c.batch_sizes == batch_size)[0])
        values = c.values[s]
        return {
            "batch_size": batch_size, "index": s, "values": values, "mean": float(values.mean()),
            "std": float(c.std[s]), "full": c.full, "overlap": float(c.overlaps[s].mean()),
            "excess": float(values.mean() - c.full), "ratio": float(values.mean() / c.full),
            "max_stable_lr": float(2.0 / values.mean()), "coefficient": c.excess_coefficient(),
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        c = self.curve
        fig = Figure(figsize=(13, 3.9), layout="constrained")
        ax_hist, ax_curve, ax_overlap = fig.subplots(1, 3)
        b = result["batch_size"]

        hi = max(c.values.max(), c.full) * 1.05
        lo = min(c.values.min(), c.full) * 0.95
        bins = np.linspace(lo, hi, 31)
        full_batch = b == c.num_samples
        ax_hist.hist(result["values"][:1] if full_batch else result["values"], bins=bins, color="tab:blue", alpha=0.75,
                     label="the full batch" if full_batch else f"mini-batches, B = {b}")
        ax_hist.axvline(result["mean"], color="tab:blue", lw=2, ls="--", label=f"mean {result['mean']:.2f}")
        ax_hist.axvline(c.full, color="k", lw=2, label=f"full batch {c.full:.2f}")
        ax_hist.set_xlabel(r"$\lambda_{\max}(H_B)$ (top Hessian eigenvalue)")
        ax_hist.set_ylabel("number of mini-batches")
        ax_hist.set_title(f"B = N = {b}: one Hessian, no spread" if full_batch else
                          f"B = {b}: {len(result['values'])} mini-batches, std {result['std']:.2f}")
        ax_hist.legend(fontsize=8)

        sizes = c.batch_sizes
        fine = np.geomspace(sizes[0], c.num_samples, 200)
        ax_curve.fill_between(sizes, c.mean - c.std, c.mean + c.std, color="tab:blue", alpha=0.2,
                              label="mean ± 1 std over mini-batches")
        ax_curve.plot(sizes, c.mean, "o-", color="tab:blue", label=r"mean $\lambda_{\max}(H_B)$")
        ax_curve.plot(fine, c.model_curve(fine), color="tab:orange", lw=1.5,
                      label=rf"fit $\lambda + c\,(1/B - 1/N)$, c = {result['coefficient']:.1f}")
        ax_curve.axhline(c.full, color="k", lw=1, ls=":", label="full batch")
        ax_curve.plot([b], [result["mean"]], "o", ms=13, mfc="none", mec="crimson", mew=2.5, label=f"B = {b}")
        ax_curve.set_xscale("log", base=2)
        ax_curve.set_xlabel("batch size B (samples, log scale)")
        ax_curve.set_ylabel(r"$\lambda_{\max}(H_B)$")
        ax_curve.set_title(f"mean sharpness: {result['ratio']:.2f}x the full batch's at B = {b}")
        ax_curve.legend(fontsize=8)

        ax_overlap.plot(sizes, c.overlaps.mean(axis=1), "s-", color="tab:green", label="mean over mini-batches")
        ax_overlap.plot([b], [result["overlap"]], "o", ms=13, mfc="none", mec="crimson", mew=2.5, label=f"B = {b}")
        ax_overlap.set_xscale("log", base=2)
        ax_overlap.set_ylim(0, 1.05)
        ax_overlap.set_xlabel("batch size B (samples, log scale)")
        ax_overlap.set_ylabel(r"overlap $|\langle v_B, v\rangle|$")
        ax_overlap.set_title("top eigenvector of $H_B$ vs of $H$")
        ax_overlap.legend(fontsize=8, loc="lower right")
        return fig
