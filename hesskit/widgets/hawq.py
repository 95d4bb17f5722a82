"""Notebook 11 (`11_hawq_mixed_precision.ipynb`): the HAWQ explorer, the bit budget, the
sensitivity proxy and the set of widths over an exhaustive enumeration.

What it shows is computed in `hesskit.experiments.hawq` (the problem, the proxies' cost tables, the
enumeration, `compare_at_budget`); this module holds the controls and the drawing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..experiments.hawq import PROXIES, BudgetComparison, compare_at_budget, restrict
from ..quant.allocate import CostTable, Enumeration, frontier_from_table
from .explorer import Explorer

__all__ = ["HAWQExplorer"]

COLORS = {"trace": "tab:blue", "eigenvalue": "tab:orange", "qbert": "tab:purple", "weights": "0.5",
          "measured": "tab:green", "pairs": "tab:red"}
CHOICE_SETS = {"{2, 3, 4, 8}": (2, 3, 4, 8), "{2, 4, 8}": (2, 4, 8), "{2, 3, 4}": (2, 3, 4), "{3, 4, 8}": (3, 4, 8),
               "{2, 8}": (2, 8), "{4, 8} (HAWQ-V3)": (4, 8)}


class HAWQExplorer(Explorer):
    """The budget (average bits per weight), the proxy and the set of widths: the proxy's Pareto
    frontier with the chosen point, the chosen widths per layer next to the exhaustive best, and
    the test accuracy of the chosen configuration against uniform precision, the median random
    configuration of the same size and the exhaustive best (all looked up in the enumeration)."""

    def __init__(self, tables: Mapping[str, CostTable], enumeration: Enumeration, avg_bits: float = 2.5,
                 proxy: str = "HAWQ-V2: Tr(H)/n", choices: str = "{2, 3, 4, 8}"):
        import ipywidgets as widgets

        options = [name for name, key in PROXIES.items() if key in tables]
        if proxy not in options:
            raise ValueError(f"proxy: expected one of {options}, got {proxy!r}")
        sets = [name for name, c in CHOICE_SETS.items() if set(c) <= set(enumeration.choices)]
        if choices not in sets:
            raise ValueError(f"choices: expected one of {sets}, got {choices!r}")
        self.tables, self.enumeration = dict(tables), enumeration
        self._frontiers: dict[tuple[str, tuple[int, ...]], Any] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "avg_bits": widgets.FloatSlider(value=avg_bits, min=2.0, max=8.0, step=0.25, description="average bits",
                                            readout_format=".2f", continuous_update=False, style=style),
            "proxy": widgets.Dropdown(options=options, value=proxy, description="proxy", style=style),
            "choices": widgets.Dropdown(options=sets, value=choices, description="widths", style=style),
        })

    def frontier(self, key: str, choices: tuple[int, ...]):
        if (key, choices) not in self._frontiers:
            self._frontiers[(key, choices)] = frontier_from_table(restrict(self.tables[key], choices))
        return self._frontiers[(key, choices)]

    def compute(self, avg_bits: float, proxy: str, choices: str) -> dict:
        key, widths = PROXIES[proxy], CHOICE_SETS[choices]
        frontier = self.frontier(key, widths)
        e = self.enumeration
        true = np.array([e.value(frontier.config(p), "accuracy") for p in range(len(frontier))])
        result = {"proxy": proxy, "key": key, "choices": widths, "avg_bits": float(avg_bits), "frontier": frontier,
                  "frontier_accuracy": true, "feasible": avg_bits >= min(widths)}
        if not result["feasible"]:
            return result
        c = compare_at_budget({key: self.tables[key]}, e, avg_bits, widths)
        config, accuracy = c.chosen[key]
        result.update(comparison=c, config=config, accuracy=accuracy, predicted=c.predicted[key],
                      average=sum(config[n] * k for n, k in zip(e.layers, self._sizes())) / e.total_params,
                      gap=c.best[1] - accuracy)
        return result

    def _sizes(self) -> list[int]:
        t = next(iter(self.tables.values()))
        return list(t.num_params)

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12.5, 5.0))
        ax_f, ax_b, ax_a = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1, 1]})
        fig.subplots_adjust(left=0.06, right=0.985, bottom=0.3, top=0.9, wspace=0.42)
        twin = self._draw_frontier(ax_f, result)
        e = self.enumeration
        ax_b.set_xlabel("layer (input → output)")
        ax_b.set_ylabel("bits")
        ax_b.set_xticks(range(len(e.layers)), [f"{i + 1}" for i in range(len(e.layers))])
        ax_a.set_ylabel("test accuracy (%)")
        if not result["feasible"]:
            self._draw_infeasible(ax_f, ax_b, ax_a, result)
            return fig
        self._mark_chosen(ax_f, twin, result)
        self._draw_widths(ax_b, result)
        self._draw_accuracy(ax_a, result)
        return fig

    def _draw_frontier(self, ax_f, result: dict):
        """The proxy's Pareto frontier, the budget, and (on a twin axis, returned) the test accuracy
        of every frontier point."""
        frontier, color = result["frontier"], COLORS[result["key"]]
        x = frontier.average_bits
        ax_f.step(x, frontier.omega, where="post", color=color, lw=1.2)
        ax_f.plot(x, frontier.omega, "o", ms=3, color=color, label=f"frontier ({len(frontier)} points)")
        if (frontier.omega > 0).all():
            ax_f.set_yscale("log")
        ax_f.axvline(result["avg_bits"], color="k", ls="--", lw=0.8, label=f"budget {result['avg_bits']:.2f} bits")
        ax_f.set_xlabel("average bits per weight")
        ax_f.set_ylabel("predicted Ω (proxy's units)")
        twin = ax_f.twinx()
        twin.plot(x, 100 * result["frontier_accuracy"], "s", ms=3, color="0.3", alpha=0.6,
                  label="test accuracy of frontier points")
        twin.set_ylabel("test accuracy (%)", color="0.3")
        twin.set_ylim(0, 100)
        return twin

    @staticmethod
    def _draw_infeasible(ax_f, ax_b, ax_a, result: dict) -> None:
        """No configuration fits the budget: say so in every panel."""
        ax_f.set_title(f"{result['proxy']}\nno configuration fits", fontsize=10)
        for ax in (ax_b, ax_a):
            ax.text(0.5, 0.5, f"{result['avg_bits']:.2f} bits < smallest width {min(result['choices'])}",
                    ha="center", va="center", transform=ax.transAxes)
        ax_b.set_title("chosen widths", fontsize=10)
        ax_a.set_title("test accuracy", fontsize=10)
        lines, labels = ax_f.get_legend_handles_labels()
        ax_f.legend(lines, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)

    @staticmethod
    def _mark_chosen(ax_f, twin, result: dict) -> None:
        """The chosen frontier point, and the legend of both frontier axes."""
        frontier, color = result["frontier"], COLORS[result["key"]]
        x = frontier.average_bits
        p = np.flatnonzero(frontier.average_bits <= result["avg_bits"] + 1e-12)[-1]
        ax_f.plot([x[p]], [frontier.omega[p]], "*", ms=15, color=color, mec="k", label="chosen")
        lines, labels = ax_f.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax_f.legend(lines + more[0], labels + more[1], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                    ncol=2)
        ax_f.set_title(f"{result['proxy']}: Pareto frontier", fontsize=10)

    def _draw_widths(self, ax_b, result: dict) -> None:
        """The chosen width of every layer next to the exhaustive best's."""
        c: BudgetComparison = result["comparison"]
        e, color = self.enumeration, COLORS[result["key"]]
        pos = np.arange(len(e.layers))
        best_config = c.best[0]
        ax_b.bar(pos - 0.2, [result["config"][n] for n in e.layers], 0.4, color=color, label="chosen")
        ax_b.bar(pos + 0.2, [best_config[n] for n in e.layers], 0.4, color="0.6", label="exhaustive best")
        ax_b.set_yticks(sorted(set(e.choices)))
        ax_b.set_ylim(0, 9)
        ax_b.legend(fontsize=8, loc="upper left")
        ax_b.set_title(f"chosen widths: {result['average']:.2f} bits per weight", fontsize=10)

    @staticmethod
    def _draw_accuracy(ax_a, result: dict) -> None:
        """Test accuracy: float, chosen, uniform, the random median (with quartiles) and the best."""
        c: BudgetComparison = result["comparison"]
        color = COLORS[result["key"]]
        labels = ["float", "chosen", f"uniform\n{c.uniform[0]}-bit" if c.uniform else "uniform\n(none fits)",
                  f"random\nmedian\n(n = {c.num_random})", "best\n(oracle)"]
        values = [c.float_accuracy, result["accuracy"], c.uniform[1] if c.uniform else np.nan, c.random_median,
                  c.best[1]]
        colors = ["0.8", color, "tab:olive", "tab:cyan", "0.45"]
        bars = ax_a.bar(range(5), 100 * np.nan_to_num(np.array(values)), color=colors)
        if c.num_random:
            q = 100 * np.array(c.random_quartiles)
            median = 100 * c.random_median
            ax_a.errorbar([3], [median], yerr=[[median - q[0]], [q[1] - median]], color="k", capsize=4, lw=1)
        tops = [v if k != 3 or not c.num_random else max(v, c.random_quartiles[1]) for k, v in enumerate(values)]
        for bar, v, top in zip(bars, values, tops):
            if np.isfinite(v):
                ax_a.text(bar.get_x() + bar.get_width() / 2, 100 * top + 1, f"{100 * v:.1f}", ha="center", fontsize=8)
        ax_a.set_xticks(range(5), labels, fontsize=8)
        ax_a.set_ylim(0, 108)
        ax_a.set_title(f"test accuracy; gap to the best: {100 * result['gap']:.1f} points", fontsize=10)
