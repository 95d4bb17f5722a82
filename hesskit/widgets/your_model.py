"""Notebook 15: the explorer of your own model's curvature, block group by block group.

`YourModelExplorer` picks a block group of a Hugging Face model (embeddings, an attention, MLP or
LayerNorm group of one layer, the head), an estimator (a Hessian trace by XTrace, Hutch++ or
Hutchinson, Lanczos' top eigenvalue, or the GGN diagonal by XDiag or Hutchinson) and a budget of
products, and draws the estimates; what it computes (`estimate_block`, `group_estimates`) and
everything else the notebook measures (the task, the fine-tuning, per-block curvature,
quantization, Sophia-G against AdamW) live in `hesskit.experiments.your_model`. `COLORS` are the
groups' plot colours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..experiments.your_model import (CRITERION, DIAGONAL_METHODS, EIGENVALUE, ESTIMATORS, TRACE_METHODS, block_group,
                                      block_sets, group_estimates)
from .explorer import Explorer

__all__ = ["COLORS", "YourModelExplorer"]

COLORS = {"embeddings": "tab:purple", "attention": "tab:blue", "MLP": "tab:orange", "LayerNorm": "tab:green",
          "head": "tab:red", "other": "tab:gray"}
# what each estimator estimates, for the axis labels
QUANTITIES = {**dict.fromkeys(TRACE_METHODS, "Tr(H)"), EIGENVALUE: "λ_max(H)",
              **dict.fromkeys(DIAGONAL_METHODS, "Tr(GGN) = sum of its diagonal")}


class YourModelExplorer(Explorer):
    """Curvature of one block group of your model (embeddings, an attention, MLP or LayerNorm
    group of one layer, the head) by the estimator you pick, with a budget of products: per module,
    the estimate (in total or per parameter) with its error bar, and on the right how the estimate
    of the group's largest module moves with the budget (for the GGN diagonal: its entries, sorted).
    Results are cached per setting."""

    def __init__(self, model: nn.Module, data: Any, group: str | None = None, estimator: str = ESTIMATORS[0],
                 products: int = 20, max_products: int = 60, per_parameter: bool = True, seed: int = 0,
                 criterion: nn.Module = CRITERION):
        import ipywidgets as widgets

        self.model, self.data, self.seed, self.criterion = model, data, seed, criterion
        modules = {name.rpartition(".")[0]: [] for name, p in model.named_parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            if p.requires_grad:
                modules[name.rpartition(".")[0]].append(name)
        self.modules = modules
        self.params = dict(model.named_parameters())
        self.sets = block_sets(list(modules))
        group = next(iter(self.sets)) if group is None else group
        if group not in self.sets:
            raise ValueError(f"group: expected one of {list(self.sets)}, got {group!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
        if not 3 <= int(products) <= int(max_products):
            raise ValueError(f"products: expected 3..{max_products}, got {products!r}")
        self._cache: dict[tuple, dict] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "group": widgets.Dropdown(options=list(self.sets), value=group, description="block group", style=style),
            "estimator": widgets.Dropdown(options=list(ESTIMATORS), value=estimator, description="estimator",
                                          style=style, layout={"width": "320px"}),
            "products": widgets.IntSlider(value=int(products), min=3, max=int(max_products), step=1,
                                          description="products per block", continuous_update=False, style=style),
            "per_parameter": widgets.ToggleButtons(options=[("per parameter", True), ("block total", False)],
                                                   value=bool(per_parameter), description="scale", style=style),
        })

    def estimates(self, group: str, estimator: str, products: int) -> dict:
        """Per module of `group`: `estimate_block`; and the convergence of the largest one
        (`group_estimates`, cached)."""
        key = (group, estimator, int(products))
        if key not in self._cache:
            modules = {name: self.modules[name] for name in self.sets[group]}
            self._cache[key] = group_estimates(self.model, self.data, modules, estimator, int(products), self.seed,
                                               self.criterion)
        return self._cache[key]

    def compute(self, group: str, estimator: str, products: int, per_parameter: bool) -> dict:
        found = self.estimates(group, estimator, products)
        names = self.sets[group]
        sizes = np.array([sum(self.params[p].numel() for p in self.modules[n]) for n in names])
        values = np.array([found["per"][n]["value"] for n in names])
        errors = np.array([found["per"][n]["error"] for n in names])
        scale = sizes if per_parameter and not estimator.startswith("top") else np.ones(len(names))
        return {
            "group": group, "estimator": estimator, "products": int(products), "per_parameter": bool(per_parameter),
            "names": names, "sizes": sizes, "values": values / scale, "errors": errors / scale,
            "converged": [found["per"][n]["converged"] for n in names],
            "num_matvecs": int(sum(found["per"][n]["num_matvecs"] for n in names)),
            "seconds": float(sum(found["per"][n]["seconds"] for n in names)),
            "largest": found["largest"], "budgets": found["budgets"],
            "path": np.array([p["value"] for p in found["path"]]),
            "path_errors": np.array([p["error"] for p in found["path"]]),
            "path_matvecs": np.array([p["num_matvecs"] for p in found["path"]]),
            "entries": {n: found["per"][n]["entries"] for n in names},
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 4.2), layout="constrained")
        ax, ax_right = fig.subplots(1, 2, width_ratios=[1.3, 1.0])
        est = result["estimator"]
        short = [n.replace("bert.", "").replace("encoder.", "").replace("attention.", "attn.") for n in result["names"]]
        per = result["per_parameter"] and est != EIGENVALUE
        _draw_estimates(ax, result, short, per)
        if est in DIAGONAL_METHODS:
            _draw_sorted_entries(ax_right, result, short)
        else:
            _draw_budget_path(ax_right, result, short, per)
        ax_right.grid(alpha=0.3)
        return fig


def _draw_estimates(ax, result: dict, short: list[str], per: bool) -> None:
    """Left: one bar per module with its error bar (2 stderr for a trace, the residual for an
    eigenvalue), "not converged" where Lanczos stopped early."""
    est, names = result["estimator"], result["names"]
    y = np.arange(len(names))
    colors = [COLORS.get(block_group(n), "tab:gray") for n in names]
    err = np.where(np.isfinite(result["errors"]), result["errors"], 0.0)
    xerr = None if est in DIAGONAL_METHODS else err if est == EIGENVALUE else 2 * err
    ax.barh(y, result["values"], xerr=xerr, color=colors, capsize=3)
    for i, ok in enumerate(result["converged"]):
        if not ok:
            ax.annotate("not converged", (result["values"][i], y[i]), fontsize=7, color="tab:red",
                        textcoords="offset points", xytext=(4, 6))
    ax.set_yticks(y, short, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"{QUANTITIES[est]}{' / parameters' if per else ''}  (loss units per squared parameter unit)")
    bars = "± 2 stderr" if est in TRACE_METHODS else "± residual" if est == EIGENVALUE else "no error bar"
    ax.set_title(f"{result['group']}: {est}, budget {result['products']} products per block ({bars})\n"
                 f"{result['num_matvecs']} products used, {result['seconds']:.1f} s", fontsize=9)
    ax.grid(alpha=0.3, axis="x")


def _draw_sorted_entries(ax, result: dict, short: list[str]) -> None:
    """Right, for the GGN diagonal: each module's positive entries, sorted, on a log scale."""
    for n, s in zip(result["names"], short):
        entries = np.sort(result["entries"][n])[::-1]
        positive = entries[entries > 0]
        ax.plot(np.arange(1, len(positive) + 1) / len(entries), positive, lw=1.5,
                label=f"{s} ({(entries <= 0).mean():.0%} ≤ 0)")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the block's parameters (sorted by estimate)")
    ax.set_ylabel("GGN diagonal entry (positive estimates)")
    ax.set_title("the diagonal entries, sorted: what Sophia-G divides\neach coordinate's step by", fontsize=9)
    ax.legend(fontsize=7)


def _draw_budget_path(ax, result: dict, short: list[str], per: bool) -> None:
    """Right, for a trace or an eigenvalue: the largest module's estimate at each budget."""
    est, names = result["estimator"], result["names"]
    b, v, e = result["path_matvecs"], result["path"], result["path_errors"]
    e = np.where(np.isfinite(e), e, 0.0)
    scale = result["sizes"][names.index(result["largest"])] if per else 1
    ax.errorbar(b, v / scale, yerr=(1 if est == EIGENVALUE else 2) * e / scale, marker="o", capsize=3,
                color=COLORS.get(block_group(result["largest"]), "tab:gray"))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("Hessian-vector products used")
    ax.set_ylabel(f"{QUANTITIES[est]}{' / parameters' if per else ''}")
    ax.set_title(f"{short[names.index(result['largest'])]} (largest in the group):\n"
                 f"the estimate at budgets {', '.join(map(str, result['budgets']))}", fontsize=9)
