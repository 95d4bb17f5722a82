"""Notebook 06 (`06_adahessian.ipynb`): the AdaHessian explorer, AdaHessian's settings against the
tuned AdamW and SGD runs of a learning-rate grid. What it trains and times lives in
`hesskit.experiments.adahessian`."""

from __future__ import annotations

import math

from ..experiments.adahessian import StepCost
from ..experiments.training import TrainingRun, Tuning
from .explorer import Explorer

__all__ = ["AdaHessianExplorer"]

COLORS = {"adahessian": "tab:red", "adamw": "tab:blue", "sgd": "tab:green"}
BASELINES = {"AdamW": ("adamw",), "SGD": ("sgd",), "AdamW and SGD": ("adamw", "sgd")}


class AdaHessianExplorer(Explorer):
    """AdaHessian's settings against the tuned AdamW / SGD runs of a `Tuning`: training loss
    against steps and against optimizer seconds, and test accuracy.

    The seconds axis is the wall-clock time measured during each run; runs measured at different
    moments on a shared machine can differ by the load. Pass `costs` (from `step_costs`, timed
    interleaved) to also report its step-time ratio for the chosen refresh period."""


    def __init__(self, tuning: Tuning, lr: float | None = None, lr_range: tuple[float, float] = (1e-3, 10**0.5),
                 max_update_every: int = 20, costs: StepCost | None = None):
        import ipywidgets as widgets

        self.tuning = tuning
        self.costs = costs
        self._cache: dict[tuple, TrainingRun] = {}
        if "adahessian" in tuning.runs:
            best = tuning.best("adahessian")
            self._cache[self._key(best.lr, 1.0, "on", 1)] = best  # the tuned run, official settings
            default_lr = best.lr
        else:
            default_lr = 0.15
        lr = default_lr if lr is None else float(lr)
        lo, hi = math.log10(lr_range[0]), math.log10(lr_range[1])
        if not lr_range[0] * (1 - 1e-9) <= lr <= lr_range[1] * (1 + 1e-9):
            raise ValueError(f"lr: expected a value in {lr_range}, got {lr}")
        style = {"description_width": "initial"}
        super().__init__({
            "lr": widgets.FloatLogSlider(value=lr, base=10, min=lo, max=hi, step=0.25, description="AdaHessian lr",
                                         continuous_update=False, readout_format=".3g", style=style),
            "hessian_power": widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.25, description="Hessian power k",
                                                 continuous_update=False, style=style),
            "spatial_average": widgets.ToggleButtons(options=["on", "off"], value="on",
                                                     description="kernel averaging", style=style),
            "update_every": widgets.IntSlider(value=1, min=1, max=max_update_every, description="refresh D every",
                                              continuous_update=False, style=style),
            "baseline": widgets.Dropdown(options=list(BASELINES), value="AdamW", description="baseline (tuned)",
                                         style=style),
        })

    @staticmethod
    def _key(lr: float, hessian_power: float, spatial_average: str, update_every: int) -> tuple:
        return (round(float(lr), 12), float(hessian_power), spatial_average, int(update_every))

    def compute(self, lr: float, hessian_power: float, spatial_average: str, update_every: int,
                baseline: str) -> dict:
        key = self._key(lr, hessian_power, spatial_average, update_every)
        if key not in self._cache:
            self._cache[key] = self.tuning.train("adahessian", float(lr), hessian_power=float(hessian_power),
                                                 spatial_average=spatial_average == "on",
                                                 update_every=int(update_every))
        run = self._cache[key]
        baselines = {name: self.tuning.best(name) for name in BASELINES[baseline]}
        adamw = self.tuning.best("adamw")
        time_ratio = run.step_time() / adamw.step_time()
        label = f"AdaHessian, u = {int(update_every)}"
        benchmark = self.costs.ratio(label) if self.costs is not None and label in self.costs.labels else math.nan
        return {
            "run": run, "baselines": baselines, "time_ratio": time_ratio, "benchmark_ratio": benchmark, "lr": float(lr),
            "hessian_power": float(hessian_power), "spatial_average": spatial_average,
            "update_every": int(update_every), "baseline": baseline, "num_hvps": run.extra["num_hvps"],
            "final_loss": run.final_loss, "final_accuracy": run.final("test_accuracy"),
            "beats": {name: run.final_loss < b.final_loss for name, b in baselines.items()},
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 4.1), layout="constrained")
        ax_step, ax_time, ax_acc = fig.subplots(1, 3)
        run = result["run"]
        curves = [(run, f"AdaHessian (lr {run.lr:.3g})", "tab:red")]
        curves += [(b, f"{b.label}, tuned", COLORS[name]) for name, b in result["baselines"].items()]
        for r, label, color in curves:
            ax_step.plot(r.eval_steps, r.evals["train_loss"], color=color, lw=2, label=label)
            ax_time.plot(r.eval_seconds(), r.evals["train_loss"], color=color, lw=2, label=label)
            ax_acc.plot(r.eval_steps, 100 * r.evals["test_accuracy"], color=color, lw=2, label=label)
        for ax in (ax_step, ax_time):
            ax.set_yscale("log")
            ax.set_ylabel("training loss (cross-entropy, all 1438 digits)")
        ax_step.set_xlabel("optimizer step")
        ax_time.set_xlabel("optimizer wall-clock time (s, evaluation excluded)")
        ax_acc.set_xlabel("optimizer step")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(0, 100)
        status = "diverged" if run.diverged else f"final loss {run.final_loss:.3g}"
        ax_step.set_title(f"AdaHessian k = {result['hessian_power']:g}, averaging {result['spatial_average']}, "
                          f"D every {result['update_every']}\n{status}", fontsize=10)
        bench = result["benchmark_ratio"]
        bench_text = f"interleaved benchmark: {bench:.1f}x; " if math.isfinite(bench) else ""
        ax_time.set_title(f"AdaHessian step {1e3 * run.step_time():.1f} ms = {result['time_ratio']:.1f}x AdamW's "
                          f"(measured)\n{bench_text}{result['num_hvps']} HVPs in {run.log.steps_taken} steps",
                          fontsize=9)
        acc = result["final_accuracy"]
        ax_acc.set_title(f"test accuracy: AdaHessian {100 * acc:.1f}%" if math.isfinite(acc)
                         else "test accuracy (AdaHessian diverged)", fontsize=10)
        for ax in (ax_step, ax_time, ax_acc):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        return fig
