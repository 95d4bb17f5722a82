"""Notebook 09 (`09_mfac.ipynb`): the M-FAC explorer, M-FAC's window size, damping and lr against
the tuned baselines, next to the IHVP error of windows of m gradients. What it trains and measures
lives in `hesskit.experiments.mfac`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..experiments.mfac import FisherProblem, IHVPErrors, ihvp_errors, ihvp_windows
from ..experiments.training import TrainingRun, Tuning
from .explorer import Explorer

__all__ = ["MFACExplorer"]

COLORS = {"mfac": "tab:red", "sgd": "tab:green", "adamw": "tab:blue", "newton-cg": "tab:purple"}
SHOW = {"SGD-momentum": "sgd", "AdamW": "adamw", "Newton-CG (GGN)": "newton-cg"}


class MFACExplorer(Explorer):
    """M-FAC's window size m, damping and lr against the tuned baselines of a `Tuning` (from
    `hesskit.experiments.mfac.tune`, whose `setup` holds the data, budget, num_grads and damping): training
    loss against steps and against optimizer seconds, test accuracy, and the IHVP error of windows
    of m gradients at the chosen damping against the dense inverse of a tiny model's full
    empirical Fisher (a `FisherProblem`)."""


    def __init__(self, tuning: Tuning, problem: FisherProblem, num_grads: int | None = None,
                 damping: float | None = None, lr: float | None = None, max_grads: int = 128,
                 damping_range: tuple[float, float] = (-6, 0), lr_range: tuple[float, float] = (-4, 0),
                 show: Sequence[str] = ("SGD-momentum", "AdamW")):
        import ipywidgets as widgets

        self.tuning, self.problem = tuning, problem
        self._runs: dict[tuple, TrainingRun] = {}
        self._errors: dict[float, IHVPErrors] = {}
        if "mfac" in tuning.runs:
            best = tuning.best("mfac")
            self._runs[self._key(tuning.setup["num_grads"], tuning.setup["damping"], best.lr)] = best
            default_lr = best.lr
        else:
            default_lr = 1e-2
        num_grads = tuning.setup["num_grads"] if num_grads is None else int(num_grads)
        damping = tuning.setup["damping"] if damping is None else float(damping)
        lr = default_lr if lr is None else float(lr)
        if not 1 <= num_grads <= min(max_grads, problem.num_samples):
            raise ValueError(f"num_grads: expected 1..{min(max_grads, problem.num_samples)}, got {num_grads}")
        style = {"description_width": "initial"}
        options = [name for name in SHOW if SHOW[name] in tuning.runs]
        super().__init__({
            "num_grads": widgets.IntSlider(value=num_grads, min=1, max=min(max_grads, problem.num_samples),
                                           description="window m", continuous_update=False, style=style),
            "damping": widgets.FloatLogSlider(value=damping, base=10, min=damping_range[0], max=damping_range[1],
                                              step=0.5, description="damping λ", readout_format=".0e",
                                              continuous_update=False, style=style),
            "lr": widgets.FloatLogSlider(value=lr, base=10, min=lr_range[0], max=lr_range[1], step=0.25,
                                         description="M-FAC lr", readout_format=".2g", continuous_update=False,
                                         style=style),
            "show": widgets.SelectMultiple(options=options, value=tuple(s for s in show if s in options),
                                           rows=len(options), description="compare with (tuned)", style=style),
        })

    @staticmethod
    def _key(num_grads: int, damping: float, lr: float) -> tuple:
        return (int(num_grads), float(f"{damping:.6g}"), float(f"{lr:.6g}"))

    def add_runs(self, runs: Sequence[TrainingRun]) -> None:
        """Reuse M-FAC runs trained elsewhere on the tuning's data and budget (e.g. a damping scan
        made with `tuning.train("mfac", lr, damping=...)`) instead of training them again."""
        for r in runs:
            if r.optimizer == "mfac" and r.log.steps_taken <= self.tuning.setup["steps"]:
                self._runs[self._key(r.settings["num_grads"], r.settings["damping"], r.lr)] = r

    def add_errors(self, errors: Sequence[IHVPErrors]) -> None:
        """Reuse IHVP error sweeps computed elsewhere on the same problem (e.g. with `ihvp_errors`);
        one is used for a damping when it covers the window sizes the widget plots."""
        for e in errors:
            if e.num_samples == self.problem.num_samples and e.dim == self.problem.dim:
                self._errors[float(f"{e.damping:.6g}")] = e

    def compute(self, num_grads: int, damping: float, lr: float, show: Sequence[str]) -> dict:
        key = self._key(num_grads, damping, lr)
        if key not in self._runs:
            self._runs[key] = self.tuning.train("mfac", float(lr), num_grads=int(num_grads), damping=float(damping))
        run = self._runs[key]
        damping_key = float(f"{damping:.6g}")
        errors = self._errors.get(damping_key)
        windows = ihvp_windows(self.problem.num_samples, num_grads)
        if errors is None or not set(windows) <= set(errors.windows.tolist()):
            errors = self._errors[damping_key] = ihvp_errors(self.problem, windows, damping)
        at = int(np.flatnonzero(errors.windows == int(num_grads))[0])
        baselines = {name: self.tuning.best(SHOW[name]) for name in show}
        reference = self.tuning.best("adamw") if "adamw" in self.tuning.runs else None
        ratio = run.step_time() / reference.step_time() if reference is not None else math.nan
        return {
            "run": run, "baselines": baselines, "errors": errors, "num_grads": int(num_grads),
            "damping": float(damping), "lr": float(lr), "error_at_m": float(errors.window[at]),
            "float32_error_at_m": float(errors.float32[at]), "rounding_at_m": float(errors.rounding[at]),
            "time_ratio": ratio, "final_loss": run.final_loss, "final_accuracy": run.final("test_accuracy"),
            "beats": {name: run.final_loss < b.final_loss for name, b in baselines.items()},
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 7.2))
        (ax_step, ax_time), (ax_acc, ax_err) = fig.subplots(2, 2)
        fig.subplots_adjust(left=0.075, right=0.985, bottom=0.08, top=0.955, wspace=0.22, hspace=0.32)
        self._draw_training(result, ax_step, ax_time, ax_acc)
        self._draw_errors(result, ax_err)
        return fig

    def _draw_training(self, result: dict, ax_step, ax_time, ax_acc) -> None:
        """M-FAC's run and the tuned baselines: training loss against steps and seconds, test accuracy."""
        from matplotlib.ticker import NullFormatter

        run = result["run"]
        label = f"M-FAC (m {result['num_grads']}, λ {result['damping']:.0e}, lr {run.lr:.2g})"
        curves = [(run, label, COLORS["mfac"])]
        curves += [(b, f"{b.label}, tuned", COLORS[b.optimizer]) for b in result["baselines"].values()]
        for r, label, color in curves:
            ax_step.plot(r.eval_steps, r.evals["train_loss"], color=color, lw=2, label=label)
            ax_time.plot(r.eval_seconds(), r.evals["train_loss"], color=color, lw=2, label=label)
            ax_acc.plot(r.eval_steps, 100 * r.evals["test_accuracy"], color=color, lw=2, label=label)
        losses = np.concatenate([r.evals["train_loss"] for r, _, _ in curves])
        losses = losses[np.isfinite(losses) & (losses > 0)]
        for ax in (ax_step, ax_time):
            ax.set_yscale("log")
            ax.set_ylabel(f"training loss (all {len(self.tuning.setup['data'][0])} digits)")
            if len(losses) and losses.max() > 10 * losses.min():  # decades are labelled: skip the minor labels
                ax.yaxis.set_minor_formatter(NullFormatter())  # (also halves the time to draw the figure)
        ax_step.set_xlabel(f"optimizer step (batch {self.tuning.setup['batch_size']})")
        ax_time.set_xlabel("optimizer wall-clock time (s, evaluation excluded)")
        ax_acc.set_xlabel(f"optimizer step (batch {self.tuning.setup['batch_size']})")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(0, 100)
        status = "diverged" if run.diverged else f"final loss {run.final_loss:.3g}"
        ax_step.set_title(f"M-FAC: {status}", fontsize=10)
        ax_time.set_title(f"median step: M-FAC {1e3 * run.step_time():.2f} ms "
                          f"= {result['time_ratio']:.1f}x AdamW's (noisy)", fontsize=10)
        acc = result["final_accuracy"]
        ax_acc.set_title(f"test accuracy: M-FAC {100 * acc:.1f}%" if math.isfinite(acc) and not run.diverged
                         else "test accuracy (M-FAC diverged)", fontsize=10)
        for ax in (ax_step, ax_time, ax_acc):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)

    @staticmethod
    def _draw_errors(result: dict, ax_err) -> None:
        """The IHVP error of windows of m gradients at the chosen damping (float64, float32, rounding alone)."""
        from matplotlib.ticker import NullFormatter, NullLocator

        e = result["errors"]
        ax_err.loglog(e.windows, e.window, "o-", color="tab:red", label="window of m vs all N (float64)")
        ax_err.loglog(e.windows, e.float32, "s--", color="tab:orange", ms=4, label="same, computed in float32")
        ax_err.loglog(e.windows, np.maximum(e.rounding, 1e-17), "^:", color="0.4", ms=4,
                      label="float32 rounding alone (same window)")
        ax_err.axvline(result["num_grads"], color="k", lw=0.8, ls="--")
        ax_err.plot([result["num_grads"]], [result["error_at_m"]], "o", ms=11, mfc="none", mec="k",
                    label=f"m = {result['num_grads']}: error {result['error_at_m']:.2g}")
        ax_err.set_xlabel(f"window size m (tiny model: N = {e.num_samples} gradients, d = {e.dim})")
        ax_err.set_ylabel("relative error of $F^{-1}\\bar g$ (vs dense $F_N$)")
        ax_err.set_title(f"IHVP error at damping λ = {result['damping']:.0e}", fontsize=10)
        ax_err.legend(fontsize=8)
        ax_err.grid(alpha=0.3)
        ax_err.yaxis.set_minor_locator(NullLocator())  # up to 17 decades: minor ticks would only cost time
        ax_err.xaxis.set_minor_formatter(NullFormatter())
