"""Notebook 08 (`08_kfac_and_mkor.ipynb`): the K-FAC explorer, K-FAC's and MKOR's knobs against
tuned SGD-momentum and AdamW on the digits. What it trains lives in `hesskit.experiments.kfac`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..experiments.kfac import KINDS, LABELS, OPTIMIZERS, run_settings, train_together
from ..experiments.tasks import Task, digits_task
from ..experiments.training import TrainingRun
from .explorer import Explorer

__all__ = ["KFACExplorer"]

COLORS = {"kfac": "C0", "mkor": "C2", "sgd": "C7", "adamw": "C1"}


class KFACExplorer(Explorer):
    """K-FAC's and MKOR's knobs against tuned SGD-momentum and AdamW on one task: training loss
    against steps and against seconds, test accuracy, and the wall time of every step."""


    def __init__(self, task: Task | None = None, steps: int = 300, kfac_lr: float = 1e-3, mkor_lr: float = 0.3,
                 damping: float = 1e-3, factor_every: int = 10, inverse_every: int = 100, mkor_every: int = 10,
                 fisher: str = "empirical",
                 baseline_lrs: dict[str, float] | None = None, show: Sequence[str] = OPTIMIZERS,
                 lr_range: tuple[float, float] = (-4, 0), damping_range: tuple[float, float] = (-5, 0),
                 max_factor_every: int = 50, max_inverse_every: int = 200, batch_size: int = 64, seed: int = 0,
                 eval_every: int = 10):
        import ipywidgets as widgets

        self.task = digits_task("mlp", hidden=(64,)) if task is None else task
        self.steps, self.batch_size, self.seed, self.eval_every = steps, batch_size, seed, eval_every
        self.baseline_lrs = {"sgd": 0.3, "adamw": 3e-2, **(baseline_lrs or {})}
        self._cache: dict[tuple, TrainingRun] = {}
        style = {"description_width": "initial"}
        slider = dict(continuous_update=False, style=style)
        lr = dict(base=10, min=lr_range[0], max=lr_range[1], step=0.25, readout_format=".2g", **slider)
        super().__init__({
            "kfac_lr": widgets.FloatLogSlider(value=kfac_lr, description="K-FAC lr", **lr),
            "mkor_lr": widgets.FloatLogSlider(value=mkor_lr, description="MKOR lr", **lr),
            "damping": widgets.FloatLogSlider(value=damping, base=10, min=damping_range[0], max=damping_range[1],
                                              step=0.5, description="K-FAC damping", readout_format=".0e", **slider),
            "factor_every": widgets.IntSlider(value=factor_every, min=1, max=max_factor_every,
                                              description="K-FAC factor_every", **slider),
            "inverse_every": widgets.IntSlider(value=inverse_every, min=1, max=max_inverse_every,
                                               description="K-FAC inverse_every", **slider),
            "mkor_every": widgets.IntSlider(value=mkor_every, min=1, max=max_inverse_every,
                                            description="MKOR inverse_every", **slider),
            "fisher": widgets.ToggleButtons(options=["empirical", "mc"], value=fisher, description="fisher",
                                            style=style),
            "show": widgets.SelectMultiple(options=[(LABELS[n], n) for n in OPTIMIZERS], value=tuple(show),
                                           rows=4, description="show", style=style),
        })

    def add_runs(self, runs: Sequence[TrainingRun]) -> None:
        """Reuse runs trained elsewhere (a learning-rate sweep on the same task) instead of training
        them again; a run is used when all its settings match the controls'."""
        for r in runs:
            self._cache[self._key(r.optimizer, r.lr, r.settings)] = r

    @staticmethod
    def _key(name: str, lr: float, settings: dict) -> tuple:
        return (name, f"{lr:.6g}", tuple(sorted((k, f"{v:.6g}" if isinstance(v, float) else v)
                                                 for k, v in settings.items())))

    def _settings(self, name: str, **options) -> dict:
        """`train`'s arguments (besides name and lr) for `name` under the controls' `options`."""
        return run_settings(name, steps=self.steps, batch_size=self.batch_size, damping=options["damping"],
                            factor_every=options["factor_every"],
                            inverse_every=options["mkor_every" if name == "mkor" else "inverse_every"],
                            fisher=options["fisher"], kl_clip=1e-3, seed=self.seed, eval_every=self.eval_every)

    def compute(self, kfac_lr: float, mkor_lr: float, damping: float, factor_every: int, inverse_every: int,
                mkor_every: int, fisher: str, show: Sequence[str]) -> dict:
        options = dict(damping=damping, factor_every=factor_every, inverse_every=inverse_every,
                       mkor_every=mkor_every, fisher=fisher)
        lrs = {"kfac": kfac_lr, "mkor": mkor_lr, **self.baseline_lrs}
        wanted = [(name, lrs[name], self._settings(name, **options)) for name in OPTIMIZERS if name in show]
        missing = [(name, lr, settings) for name, lr, settings in wanted
                   if self._key(name, lr, settings) not in self._cache]
        trained = train_together(self.task, [dict(name=name, lr=lr, **settings) for name, lr, settings in missing])
        self.add_runs(trained)  # K-FAC and MKOR, when both changed, are trained side by side
        runs = [self._cache[self._key(name, lr, settings)] for name, lr, settings in wanted]
        timing = {r.optimizer: {"median": r.step_time(clock="cpu"), "mean": r.step_time(statistic="mean", clock="cpu"),
                                "max": r.step_time(statistic="max", clock="cpu"),
                                **{kind: r.step_time(kind, clock="cpu") for kind in KINDS}}
                  for r in runs}
        return {
            "runs": runs,
            "final_loss": {r.optimizer: r.final_loss for r in runs},
            "final_accuracy": {r.optimizer: r.final("test_accuracy") for r in runs},
            "timing": timing,
            "settings": dict(kfac_lr=kfac_lr, mkor_lr=mkor_lr, damping=damping, factor_every=factor_every,
                             inverse_every=inverse_every, mkor_every=mkor_every, fisher=fisher),
        }

    @staticmethod
    def _milliseconds_axis(ax) -> None:
        """A log-scaled y axis labelled 0.2, 0.5, 1, 2, 5 ... (plain numbers: readable, and no
        mathtext to lay out on every render), with room for the legend above the data."""
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * (high / low) ** 0.35)  # headroom for the legend above the data
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 7.6))
        grid = fig.add_gridspec(2, 3, left=0.06, right=0.99, bottom=0.08, top=0.9, wspace=0.28, hspace=0.38)
        ax_steps, ax_time, ax_acc = (fig.add_subplot(grid[0, i]) for i in range(3))
        ax_trace = fig.add_subplot(grid[1, :2])
        ax_bars = fig.add_subplot(grid[1, 2])
        runs = result["runs"]
        s = result["settings"]
        self._draw_runs(runs, ax_steps, ax_time, ax_acc, ax_trace)
        self._label_curves(runs, ax_steps, ax_time, ax_acc)
        self._label_trace(runs, s, ax_trace)
        self._draw_bars(result, ax_bars)
        fig.suptitle(f"{self.task.name}, {self.task.num_params()} parameters, batch "
                     f"{self.batch_size}: K-FAC damping {s['damping']:.0e}, fisher = {s['fisher']}", fontsize=11)
        return fig

    @staticmethod
    def _draw_runs(runs: Sequence[TrainingRun], ax_steps, ax_time, ax_acc, ax_trace) -> None:
        """Each run's training loss against steps and seconds, its test accuracy, and the CPU time of
        its every step (K-FAC, MKOR; a dashed median for the baselines)."""
        for run in runs:
            label = run.label + (" (diverged)" if run.diverged else "")
            color = COLORS[run.optimizer]
            ax_steps.semilogy(run.eval_steps, run.evals["train_loss"], color=color, label=label)
            ax_time.semilogy(run.eval_seconds(), run.evals["train_loss"], color=color, label=label)
            ax_acc.plot(run.eval_steps, 100 * run.evals["test_accuracy"], color=color, label=label)
            median, longest = 1e3 * run.step_time(clock="cpu"), 1e3 * run.step_time(statistic="max", clock="cpu")
            text = f"{run.name}: median {median:.2f} ms, max {longest:.1f} ms"
            if run.optimizer in ("kfac", "mkor"):
                steps = np.arange(1, len(run.log.cpu_seconds) + 1)
                ms = 1e3 * run.log.cpu_seconds
                ax_trace.plot(steps, ms, color=color, lw=0.7, alpha=0.8, label=text)
                for kind, marker in (("factors", "."), ("inverse", "v")):
                    chosen = run.per_step["kinds"] == kind
                    ax_trace.plot(steps[chosen], ms[chosen], marker, color=color, ms=7 if kind == "inverse" else 4)
            else:
                ax_trace.axhline(median, color=color, ls="--", lw=1.2, label=text)
        if not runs:
            ax_steps.text(0.5, 0.5, "select at least one optimizer\nunder 'show'", ha="center", va="center",
                          transform=ax_steps.transAxes)

    @staticmethod
    def _label_curves(runs: Sequence[TrainingRun], ax_steps, ax_time, ax_acc) -> None:
        """Axis labels and titles of the loss and accuracy panels, and the legend."""
        ax_steps.set_xlabel("optimizer steps")
        ax_time.set_xlabel("training wall-clock time (s)")
        for ax in (ax_steps, ax_time):
            ax.set_ylabel("training-set loss (cross-entropy)")
        ax_steps.set_title("loss against steps", fontsize=10)
        ax_time.set_title("loss against wall-clock seconds", fontsize=10)
        ax_acc.set_xlabel("optimizer steps")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(50, 100)
        finals = ", ".join(f"{r.name} {100 * r.final('test_accuracy'):.1f}%" for r in runs)
        ax_acc.set_title(f"final: {finals}" if runs else "test accuracy", fontsize=8)
        if runs:
            ax_steps.legend(fontsize=7)

    def _label_trace(self, runs: Sequence[TrainingRun], s: dict, ax_trace) -> None:
        """The legend, millisecond axis, labels and title of the per-step cost trace."""
        if runs:
            ax_trace.legend(fontsize=7, loc="upper right")
            self._milliseconds_axis(ax_trace)
        ax_trace.set_xlabel("optimizer step")
        ax_trace.set_ylabel("CPU time of the step (ms)")
        ax_trace.set_title(f"cost of every step (dashed: baselines' medians). Dots: factor steps (K-FAC, every "
                           f"{s['factor_every']}); triangles: inverse steps (K-FAC eigh every "
                           f"{s['inverse_every']}, MKOR rank-1 every {s['mkor_every']})", fontsize=9)

    def _draw_bars(self, result: dict, ax_bars) -> None:
        """The median CPU time per step of each kind (plain, factors, inverse), the mean and the slowest step."""
        runs = result["runs"]
        names = [r.optimizer for r in runs]
        x = np.arange(len(names))
        width = 0.8 / len(KINDS)
        for k, kind in enumerate(KINDS):
            heights = np.array([1e3 * result["timing"][n][kind] for n in names])
            shown = np.isfinite(heights)
            ax_bars.bar(x[shown] + (k - 1) * width, heights[shown], width, color=["0.8", "0.55", "0.25"][k],
                        label=f"median, {kind} steps")
        ax_bars.plot(x, [1e3 * result["timing"][n]["mean"] for n in names], "k_", ms=20, mew=2,
                     label="mean over all steps")
        ax_bars.plot(x, [1e3 * result["timing"][n]["max"] for n in names], "rv", ms=6, label="slowest step")
        if runs:
            self._milliseconds_axis(ax_bars)
        ax_bars.set_xticks(x, [LABELS[n] for n in names], fontsize=8)
        ax_bars.set_ylabel("CPU time per step (ms)")
        ax_bars.set_title("time per step, by what the step did", fontsize=10)
        ax_bars.legend(fontsize=7)
