"""Notebook 04 (`04_loss_landscape_and_sharpness.ipynb`): the sharpness explorer, training from a fixed
initialisation at a learning rate and batch size, with lambda_max against the stability threshold
2/eta and the trace of the Hessian (`hk.trace`'s default, XTrace). What it trains and measures lives
in `hesskit.experiments.sharpness`."""

from __future__ import annotations

import copy
import math

import numpy as np

from ..experiments.sharpness import SharpnessRun, digits_problem, train
from .explorer import Explorer

__all__ = ["SharpnessExplorer"]


class SharpnessExplorer(Explorer):
    """Learning rate and batch size: train from a fixed initialisation, watch lambda_max vs 2/eta."""


    def __init__(self, num_samples: int = 256, hidden: tuple[int, ...] = (16, 16), steps: int = 600,
                 measure_every: int = 10, trace_every: int = 100, trace_matvecs: int = 30,
                 lr: float = 1.0, batch_size: int | None = None, lr_range: tuple[float, float] = (0.05, 5.0),
                 seed: int = 0):
        import ipywidgets as widgets

        self.model, self.criterion, self.data = digits_problem(num_samples, hidden, seed)
        self.settings = dict(steps=steps, measure_every=measure_every, trace_every=trace_every,
                             trace_matvecs=trace_matvecs, seed=seed)
        self._cache: dict[tuple[float, int], SharpnessRun] = {}
        sizes = [2**k for k in range(1, 20) if 2**k < num_samples] + [num_samples]
        options = [(f"{b} (full batch: GD)" if b == num_samples else str(b), b) for b in sizes]
        lo, hi = np.log10(lr_range[0]), np.log10(lr_range[1])
        super().__init__({
            "lr": widgets.FloatLogSlider(value=lr, base=10, min=lo, max=hi, step=(hi - lo) / 40,
                                         description="learning rate η", readout_format=".3g",
                                         continuous_update=False, style={"description_width": "initial"}),
            "batch_size": widgets.Dropdown(options=options, value=num_samples if batch_size is None else batch_size,
                                           description="batch size"),
        })

    def compute(self, lr: float, batch_size: int) -> dict:
        key = (round(float(lr), 10), int(batch_size))
        if key not in self._cache:
            self._cache[key] = train(copy.deepcopy(self.model), self.criterion, self.data, lr, batch_size,
                                     **self.settings)
        run = self._cache[key]
        return {"run": run, "lr": float(lr), "batch_size": int(batch_size), "threshold": 2.0 / lr,
                "final_sharpness": float(run.sharpness[-1]) if len(run.sharpness) else math.nan,  # last measured
                "final_trace": float(run.trace[-1]) if len(run.trace) else math.nan,
                "final_loss": float(run.loss[-1]), "diverged": run.diverged,
                "num_samples": len(self.data[0])}

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        run = result["run"]
        fig = Figure(figsize=(12, 3.7), layout="constrained")
        ax_loss, ax_sharp, ax_trace = fig.subplots(1, 3)
        ax_loss.semilogy(np.arange(len(run.loss)), run.loss, lw=1)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("full-batch training loss (MSE)")
        ax_loss.set_title("training loss")
        ax_sharp.plot(run.steps, run.sharpness, ".-", ms=4, clip_on=False, label="λ_max of the Hessian")
        ax_sharp.axhline(result["threshold"], color="C3", ls="--", label=f"2/η = {result['threshold']:.3g}")
        top = max([result["threshold"], *run.sharpness]) if len(run.sharpness) else result["threshold"]
        ax_sharp.set_ylim(0, 1.15 * top)
        ax_sharp.set_xlabel("step")
        ax_sharp.set_ylabel("sharpness λ_max")
        ax_sharp.set_title("sharpness vs the stability threshold")
        ax_sharp.legend(loc="lower right")
        if len(run.trace):
            ax_trace.errorbar(run.trace_steps, run.trace, yerr=2 * run.trace_stderr, fmt="o-", ms=4, capsize=3,
                              color="C2", label=f"tr H ({run.trace_method}, ±2 s.e.)")
            ax_trace.legend(loc="lower right")
        ax_trace.set_xlabel("step")
        ax_trace.set_ylabel("trace of the Hessian")
        ax_trace.set_title("total curvature")
        for ax in (ax_loss, ax_sharp, ax_trace):
            ax.set_xlim(0, max(len(run.loss) - 1, 1) if run.diverged else self.settings["steps"])
        mode = "full-batch GD" if result["batch_size"] == result["num_samples"] else f"SGD, batch {result['batch_size']}"
        if run.diverged:
            status = (f"DIVERGED at step {run.diverged_at}; last measured λ_max = {result['final_sharpness']:.3g} "
                      f"(step {run.steps[-1]})")
        else:
            status = f"final loss {result['final_loss']:.3g}, final λ_max = {result['final_sharpness']:.3g}"
        fig.suptitle(f"{mode}, η = {result['lr']:.3g} (2/η = {result['threshold']:.3g}): {status}")
        return fig
