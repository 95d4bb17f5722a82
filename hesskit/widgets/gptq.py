"""Notebook 14 (`14_gptq.ipynb`): the GPTQ explorer, GPTQ against round-to-nearest on a trained
digits MLP with GPTQ's options as controls.

The task and the measurements come from `hesskit.experiments.gptq` (`trained_digits`, `layer_errors`)
and `hesskit.experiments.tasks` (`evaluate`); this module holds the controls and the drawing.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..experiments.gptq import layer_errors, trained_digits
from ..experiments.tasks import TrainedModel, evaluate
from ..quant.gptq import gptq, gptq_layers, round_to_nearest
from .explorer import Explorer

__all__ = ["GPTQExplorer"]

COLORS = {"float": "tab:gray", "RTN": "tab:red", "GPTQ": "tab:blue"}


# --------------------------------------------------------------------------- the widget
class GPTQExplorer(Explorer):
    """GPTQ against round-to-nearest on a trained digits MLP: bits, group size, damping, act order,
    number of calibration samples and grid type; test accuracy and loss of the float, RTN and GPTQ
    models, and each layer's relative reconstruction error on the test inputs."""

    CALIBRATION = (16, 32, 64, 128, 256, 512, 1024)

    def __init__(self, task: TrainedModel | None = None, bits: int = 2, group_size: int | None = None,
                 damping: float = 0.01, act_order: bool = False, calibration_samples: int = 128,
                 symmetric: bool = False):
        import ipywidgets as widgets

        self.task = trained_digits() if task is None else task
        self.float_result = evaluate(self.task.model, self.task.test)
        self._rtn: dict[tuple, tuple] = {}
        pool = len(self.task.train[0])
        sizes = [n for n in self.CALIBRATION if n <= pool]
        if calibration_samples not in sizes:
            raise ValueError(f"calibration_samples: expected one of {sizes}, got {calibration_samples!r}")
        widths = [layer.weight[0].numel() for layer in gptq_layers(self.task.model).values()]
        groups = [("per row", 0)] + [(str(g), g) for g in (32, 16, 8) if all(w % g == 0 for w in widths)]
        if (group_size or 0) not in [g for _, g in groups]:
            raise ValueError(f"group_size: expected one of {[g or None for _, g in groups]}, got {group_size!r}")
        style = {"description_width": "initial"}
        super().__init__({
            "bits": widgets.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False,
                                      style=style),
            "group_size": widgets.Dropdown(options=groups, value=group_size or 0, description="group size",
                                           style=style, layout={"width": "170px"}),
            "damping": widgets.FloatLogSlider(value=damping, base=10, min=-4, max=0, step=0.5,
                                              description="damping", readout_format=".0e",
                                              continuous_update=False, style=style),
            "act_order": widgets.ToggleButtons(options=[("natural order", False), ("act order", True)],
                                               value=act_order, description="columns", style=style),
            "calibration_samples": widgets.SelectionSlider(options=sizes, value=calibration_samples,
                                                           description="calibration samples",
                                                           continuous_update=False, style=style),
            "symmetric": widgets.ToggleButtons(options=[("asymmetric", False), ("symmetric", True)],
                                               value=symmetric, description="grid", style=style),
        })

    def compute(self, bits: int, group_size: int, damping: float, act_order: bool, calibration_samples: int,
                symmetric: bool) -> dict:
        task, group = self.task, (group_size or None)
        key = (bits, group, symmetric)
        if key not in self._rtn:  # RTN depends on neither damping, order nor calibration
            rtn = round_to_nearest(task.model, bits, group_size=group, symmetric=symmetric)
            self._rtn[key] = (evaluate(rtn, task.test), layer_errors(task.model, rtn, task.test[0]))
        rtn_metrics, rtn_errors = self._rtn[key]
        start, failure = time.perf_counter(), None
        try:
            quant = gptq(task.model, task.calibration(calibration_samples), bits, group_size=group,
                         symmetric=symmetric, damping=damping, act_order=act_order)
            metrics = evaluate(quant, task.test)
            gptq_acc, gptq_loss = metrics.percent, metrics.loss
            gptq_errors = layer_errors(task.model, quant, task.test[0])
        except ValueError as error:
            failure = str(error)
            gptq_acc = gptq_loss = math.nan
            gptq_errors = {name: math.nan for name in rtn_errors}
        return {
            "bits": bits, "group_size": group, "damping": float(damping), "act_order": act_order,
            "calibration_samples": calibration_samples, "symmetric": symmetric,
            "float_accuracy": self.float_result.percent, "float_loss": self.float_result.loss,
            "rtn_accuracy": rtn_metrics.percent, "rtn_loss": rtn_metrics.loss,
            "gptq_accuracy": gptq_acc, "gptq_loss": gptq_loss,
            "rtn_errors": rtn_errors, "gptq_errors": gptq_errors, "failure": failure,
            "seconds": time.perf_counter() - start,
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.3))
        ax_acc, ax_err = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
        fig.subplots_adjust(left=0.07, right=0.985, bottom=0.15, top=0.86, wspace=0.25)
        names = ["float", "RTN", "GPTQ"]
        accs = [result["float_accuracy"], result["rtn_accuracy"], result["gptq_accuracy"]]
        losses = [result["float_loss"], result["rtn_loss"], result["gptq_loss"]]
        bars = ax_acc.bar(names, [0 if math.isnan(a) else a for a in accs], color=[COLORS[n] for n in names])
        for bar, a, l in zip(bars, accs, losses):
            text = "failed" if math.isnan(a) else f"{a:.1f}%\nloss {l:.2f}"
            ax_acc.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0) + 1, text, ha="center",
                        va="bottom", fontsize=9)
        ax_acc.set_ylim(0, 122)
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_title("test accuracy (and cross-entropy)")

        layers = list(result["rtn_errors"])
        x = np.arange(len(layers))
        for offset, method in ((-0.2, "RTN"), (0.2, "GPTQ")):
            values = [result[f"{method.lower()}_errors"][n] for n in layers]
            ax_err.bar(x + offset, [v if v > 0 and math.isfinite(v) else np.nan for v in values], width=0.4,
                       color=COLORS[method], label=method)
        ax_err.set_yscale("log")
        ax_err.set_xticks(x, [f"layer {n}\n{tuple(self.task.model.get_submodule(n).weight.shape)}" for n in layers])
        ax_err.set_xlabel("layer (weight shape)")
        ax_err.set_ylabel(r"$\|WX - QX\|^2 / \|WX\|^2$ on test inputs")
        ax_err.set_title("layer-wise reconstruction error")
        ax_err.legend()
        if result["failure"]:
            ax_err.text(0.5, 0.5, "GPTQ failed:\n" + _wrap(result["failure"], 60), transform=ax_err.transAxes,
                        ha="center", va="center", fontsize=8, color="darkred",
                        bbox={"facecolor": "white", "edgecolor": "darkred"})
        grid = "symmetric" if result["symmetric"] else "asymmetric"
        groups = "per row" if result["group_size"] is None else f"groups of {result['group_size']} columns"
        fig.suptitle(f"{result['bits']}-bit {grid} grid, {groups}; GPTQ: damping {result['damping']:.0e}, "
                     f"{'act order' if result['act_order'] else 'natural order'}, "
                     f"{result['calibration_samples']} calibration samples ({result['seconds']:.2f} s)")
        return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
