"""Notebook 10 (`10_optimizer_shootout.ipynb`): the explorer of the optimizer shootout.

`ShootoutExplorer` re-summarises and re-plots a stored `hesskit.experiments.shootout.Grid` (and
trains extra runs only for learning rates between the grid points, which it marks as extra
tuning); the protocol, the runs and the summary live in `hesskit.experiments.shootout`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..experiments.shootout import LR_FACTORS, REGISTRY, Grid, Summary, summarise, target_loss
from .explorer import Explorer

__all__ = ["BEST", "COLORS", "LR_OPTIONS", "ShootoutExplorer"]

COLORS = dict(zip(REGISTRY, ["tab:gray", "tab:blue", "tab:red", "tab:orange", "tab:brown", "tab:green", "tab:olive",
                             "tab:purple", "tab:cyan"]))
# lr choices: the grid factors, and the half steps between them (extra runs: not part of the fair budget).
# "Best from grid" is a string, not None: a Dropdown whose value is None shows a blank selection.
BEST = "best from grid"
LR_OPTIONS = [(BEST, BEST)] + [
    (f"grid centre x {f:.3g}" + ("" if any(math.isclose(f, g) for g in LR_FACTORS) else " (extra run)"), f)
    for f in (1 / 9, 3**-1.5, 1 / 3, 3**-0.5, 1.0, 3**0.5, 3.0, 3**1.5, 9.0)
]


def _log_tick_labels(ax) -> None:
    """Plain-number labels on a log y axis; label the 2 and 5 minor ticks too when it spans under two decades."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    if low > 0 and high / low < 100:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


class ShootoutExplorer(Explorer):
    """The stored grid, re-summarised: pick the optimizers, each one's lr ("best from grid", a grid
    point, or a point between grid points, which trains 3 extra runs), the x axis and the target.

    Shows the training loss (mean over seeds and min-max band) against steps or seconds, the lr
    sensitivity curves (median final loss over the grid), and the summary table."""


    def __init__(self, grid: Grid, target: float | None = None, selected: Sequence[str] | None = None):
        import ipywidgets as widgets

        self.grid = grid
        self.default_target = target_loss(grid) if target is None else float(target)
        self.choices: dict[str, float | None] = {name: None for name in grid.names}  # lr factor per optimizer
        losses = [r.evals["train_loss"] for r in grid.runs.values()]
        finite = np.concatenate([loss[np.isfinite(loss)] for loss in losses] or [[1.0]])
        low = math.log10(max(float(finite.min()), 1e-4))
        high = math.log10(float(finite.max()))
        value = min(max(self.default_target, 10**low), 10**high) if math.isfinite(self.default_target) else 10**high
        style = {"description_width": "initial"}
        selected = list(grid.names) if selected is None else list(selected)
        self.lr_of = widgets.Dropdown(options=list(grid.names), value=grid.names[0], description="lr of", style=style)
        self.lr = widgets.Dropdown(options=LR_OPTIONS, value=BEST, description="lr", style=style)
        self.lr_of.observe(self._show_choice, names="value")  # before render: show that optimizer's choice first
        super().__init__({
            "optimizers": widgets.SelectMultiple(options=list(grid.names), value=tuple(selected), rows=len(grid.names),
                                                 description="optimizers", style=style,
                                                 layout=widgets.Layout(width="380px")),
            "lr_of": self.lr_of,
            "lr": self.lr,
            "x_axis": widgets.ToggleButtons(options=["steps", "seconds"], value="steps", description="x axis",
                                            style=style),
            "target": widgets.FloatLogSlider(value=value, base=10, min=low, max=high, step=0.02,
                                             description="target loss", readout_format=".3f",
                                             continuous_update=False, style=style),
        })

    def _show_choice(self, change: Any) -> None:
        choice = self.choices[change["new"]]
        self.lr.value = BEST if choice is None else choice

    def compute(self, optimizers: Sequence[str], lr_of: str, lr: float | str, x_axis: str, target: float) -> dict:
        self.choices[lr_of] = None if lr == BEST else lr
        names = list(optimizers)
        lrs = {n: None if self.choices[n] is None else self.grid.centre(n) * self.choices[n] for n in names}
        summary = summarise(self.grid, lrs=lrs, target=float(target), names=names)
        return {"summary": summary, "x_axis": x_axis, "target": float(target), "names": names,
                "choices": dict(self.choices), "default_target": self.default_target,
                "winner_steps": summary.winner("steps"), "winner_seconds": summary.winner("seconds")}

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        summary: Summary = result["summary"]
        rows = list(summary.rows.values())
        # layout in inches: title 0.55, plots 3.5, axis labels and table title 1.05, table 0.28 per line
        table_height = 0.28 * (len(rows) + 1) + 0.1
        height = 0.55 + 3.5 + 1.05 + table_height
        fig = Figure(figsize=(13, height))
        bottom = (table_height + 1.05) / height
        ax_loss = fig.add_axes((0.06, bottom, 0.53, 3.5 / height))
        ax_lr = fig.add_axes((0.67, bottom, 0.32, 3.5 / height))
        self._draw_curves(ax_loss, ax_lr, rows, result["x_axis"])
        self._label_loss_axes(ax_loss, result["x_axis"], result["target"])
        self._label_lr_axes(ax_lr, rows)
        for ax in (ax_loss, ax_lr):
            _log_tick_labels(ax)
        ax_table = fig.add_axes((0.02, 0.1 / height, 0.96, (table_height + 0.05) / height))
        self._draw_table(ax_table, summary, rows, result)
        return fig

    @staticmethod
    def _draw_curves(ax_loss, ax_lr, rows: list, x_axis: str) -> None:
        """Each optimizer's training loss (mean, min-max band) and its lr sensitivity curve."""
        for row in rows:
            color = COLORS.get(row.name)
            x, mean, low, high = row.curve(x_axis)
            label = f"{row.name}, lr {row.lr:.3g}" + ("" if row.finished == len(row.runs)
                                                       else f" ({len(row.runs) - row.finished} diverged)")
            keep = x > 0 if x_axis == "seconds" else np.ones(len(x), bool)  # log time axis: drop t = 0
            if keep.any():
                ax_loss.plot(x[keep], mean[keep], color=color, lw=1.8, label=label)
                ax_loss.fill_between(x[keep], low[keep], high[keep], color=color, alpha=0.18, lw=0)
            lrs = sorted(row.scores)
            ax_lr.plot([g / row.default for g in lrs], [row.scores[g] for g in lrs], "o-", color=color, ms=4, lw=1.2)
            if math.isfinite(row.final_loss):
                ax_lr.plot(row.lr / row.default, row.final_loss, "*", color=color, ms=13, mec="k", mew=0.6)

    def _label_loss_axes(self, ax_loss, x_axis: str, target: float) -> None:
        ax_loss.axhline(target, color="k", ls="--", lw=1, label=f"target {target:.3f}")
        ax_loss.set_yscale("log")
        if x_axis == "seconds":
            ax_loss.set_xscale("log")
        ax_loss.set_xlabel("optimizer step" if x_axis == "steps" else
                           "seconds inside opt.step (wall clock, mean over seeds, log scale)")
        ax_loss.set_ylabel("training loss (cross-entropy, nats)")
        ax_loss.set_title(f"{self.grid.task.name}: mean over {len(self.grid.seeds)} seeds, band = min-max", fontsize=10)
        ax_loss.legend(fontsize=7, loc="lower left", framealpha=0.85)
        ax_loss.grid(alpha=0.3)

    @staticmethod
    def _label_lr_axes(ax_lr, rows: list) -> None:
        finals = [s for row in rows for s in row.scores.values() if math.isfinite(s)]
        ax_lr.set_xscale("log")
        ax_lr.set_yscale("log")
        if finals:
            ax_lr.set_ylim(min(finals) * 0.8, max(finals) * 1.3)
        ax_lr.set_xlabel("lr / the optimizer's default lr")
        ax_lr.set_ylabel("median final training loss (nats)")
        ax_lr.set_title("lr sensitivity on the shared grid (colours as on the left)\n"
                        "star: the lr shown; missing points: the median seed diverged", fontsize=10)
        ax_lr.grid(alpha=0.3)

    @staticmethod
    def _draw_table(ax_table, summary: Summary, rows: list, result: dict) -> None:
        """The summary table under the plots, optimizer names in their colours."""
        ax_table.axis("off")
        metric = "test accuracy %" if summary.metric == "accuracy" else "test bits/char"
        header = ["optimizer", "lr", "steps to target", "seconds to target", metric, "step time\nx AdamW",
                  "diverged\n(whole grid)"]
        cells = []
        for r in rows:
            lr_text = f"{r.lr:.3g} = {r.lr / r.default:.3g} x default" + {
                "best from grid": " (best" + ("*" if r.best_at_edge else "") + ")",
                "grid": " (by hand)", "extra": " (extra run)"}[r.chosen]
            steps = f"{r.steps_to_target:.0f}" if math.isfinite(r.steps_to_target) else "not reached"
            secs = f"{r.seconds_to_target:.2f}" if math.isfinite(r.seconds_to_target) else "-"
            decimals = 1 if summary.metric == "accuracy" else 3
            acc = f"{r.metric_mean:.{decimals}f} ± {r.metric_std:.{decimals}f}" if r.finished else "-"
            cells.append([r.name, lr_text, f"{steps} ({r.hits}/{len(r.runs)})", secs,
                          acc + ("" if r.finished == len(r.runs) else f" ({r.finished}/{len(r.runs)})"),
                          f"{r.step_ratio:.2f}", f"{r.diverged_grid}/{r.total_grid}"])
        if cells:
            table = ax_table.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="center",
                                   colWidths=[0.22, 0.2, 0.12, 0.1, 0.14, 0.08, 0.09])
            table.auto_set_font_size(False)
            table.set_fontsize(8)
            table.scale(1, 1.35)
            for key, cell in table.get_celld().items():
                if key[0] == 0:
                    cell.set_facecolor("#e8e8e8")
                elif key[1] == 0:
                    cell.get_text().set_color(COLORS.get(rows[key[0] - 1].name, "k"))
        win_s, win_t = result["winner_steps"], result["winner_seconds"]
        ax_table.set_title(f"target {result['target']:.3f} (pre-registered rule: {result['default_target']:.3f}); "
                           f"first to target in steps: {win_s or 'none'}; in seconds: {win_t or 'none'}. "
                           "* best lr at the edge of the grid", fontsize=9)
