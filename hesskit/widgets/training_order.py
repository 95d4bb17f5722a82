"""Notebook 18 (`18_training_order.ipynb`): the training-order explorer, an order of the reference
run's batches estimated by Taylor expansions (FUT, Yang et al. 2025) against the run retrained on
it, at a chosen learning rate. What it computes lives in `hesskit.experiments.training_order`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..experiments.training_order import (
    CURRICULA,
    DEFAULT_LR,
    OrderComparison,
    OrderSetup,
    compare_order,
    curriculum_order,
    order_setup,
    reversed_order,
    shuffled_order,
    swapped_order,
)
from .explorer import Explorer

__all__ = ["TrainingOrderExplorer", "ORDERS", "SHOWN"]

ORDERS = ("shuffled", "reversed", "k random swaps", *CURRICULA)
SHOWN = {"0, 1 and 2": (0, 1, 2), "1 and 2": (1, 2), "2 only": (2,), "1 only": (1,), "0 only": (0,)}
COLORS = {"reference": "0.55", "retrained": "k", 0: "tab:blue", 1: "tab:orange", 2: "tab:green"}


def _label(k: Any) -> str:
    return {"reference": "reference run", "retrained": "retrained (truth)"}.get(k, f"estimate, order {k}")


class TrainingOrderExplorer(Explorer):
    """An order of the batches (shuffled with a seed, reversed, k random swaps of the reference
    order, or a curriculum by difficulty), the Taylor orders to estimate it with and the learning
    rate: per-step distance to the retrained run, per-step batch losses and the final held-out loss."""

    def __init__(self, setups: Mapping[float, OrderSetup] | None = None,
                 lrs: Sequence[float] = (2e-3, DEFAULT_LR, 1e-2, 2e-2), lr: float = DEFAULT_LR,
                 order: str = "shuffled", seed: int = 1, swaps: int = 4, shown: str = "0, 1 and 2",
                 max_swaps: int = 64, setup_kwargs: Mapping[str, Any] | None = None):
        import ipywidgets as widgets

        lrs = sorted({float(x) for x in lrs} | {float(lr)})
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
        if shown not in SHOWN:
            raise ValueError(f"shown: expected one of {tuple(SHOWN)}, got {shown!r}")
        self.setup_kwargs = dict(setup_kwargs or {})
        self._setups: dict[float, OrderSetup] = {float(k): v for k, v in (setups or {}).items()}
        self._cache: dict[tuple, OrderComparison] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "order": widgets.Dropdown(options=list(ORDERS), value=order, description="order", style=style),
            "seed": widgets.IntSlider(value=seed, min=0, max=20, description="seed (shuffled, swaps)",
                                      continuous_update=False, style=style),
            "swaps": widgets.IntSlider(value=swaps, min=1, max=max_swaps, description="swaps k",
                                       continuous_update=False, style=style),
            "shown": widgets.ToggleButtons(options=list(SHOWN), value=shown, description="Taylor orders",
                                           style=style),
            "lr": widgets.SelectionSlider(options=[(f"{x:.0e}", x) for x in lrs], value=float(lr),
                                          description="Adam lr", continuous_update=False, style=style),
        })

    def setup(self, lr: float) -> OrderSetup:
        """The reference run at `lr` (given to the constructor, or trained once and kept)."""
        lr = float(lr)
        if lr not in self._setups:
            self._setups[lr] = order_setup(lr=lr, **self.setup_kwargs)
        return self._setups[lr]

    @staticmethod
    def make_order(setup: OrderSetup, order: str, seed: int, swaps: int) -> list[int]:
        if order == "shuffled":
            return shuffled_order(setup.steps, seed)
        if order == "reversed":
            return reversed_order(setup.steps)
        if order == "k random swaps":
            return swapped_order(setup.steps, swaps, seed)
        return curriculum_order(setup.difficulty, order)

    def compute(self, order: str, seed: int, swaps: int, shown: str, lr: float) -> dict:
        setup = self.setup(lr)
        batches = self.make_order(setup, order, seed, swaps)
        ks = SHOWN[shown]
        key = (float(lr), tuple(batches), ks)
        if key not in self._cache:
            self._cache[key] = compare_order(setup, batches, ks, order)
        comparison = self._cache[key]
        return {"comparison": comparison, "setup": setup, "taylor_orders": ks, "lr": float(lr), "order": order}

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        c: OrderComparison = result["comparison"]
        ks = result["taylor_orders"]
        fig = Figure(figsize=(14, 4))
        ax_d, ax_l, ax_h = fig.subplots(1, 3)
        steps = np.arange(len(c.order) + 1)
        for k in ("reference", *ks):
            d = np.asarray(c.step_distance[k], dtype=float)
            ax_d.semilogy(steps, np.where(d > 0, d, np.nan), color=COLORS[k], lw=2 if k == "reference" else 1.5,
                          label=_label(k))
        ax_d.set_xlabel("step t")
        ax_d.set_ylabel("distance to the retrained run at step t")
        ax_d.legend(fontsize=7)
        errors = ", ".join(f"order {k} {c.param_error[k]:.2g}" for k in ks)
        ratios = ", ".join(f"order {k} {c.term_ratio[k]:.2g}" for k in ks if k >= 1)
        ax_d.set_title(f"final error / reference's distance: {errors}"
                       + (f"\nlast Taylor term / the one before (summed over steps): {ratios}" if ratios else ""), fontsize=9)

        t = np.arange(len(c.order))
        measured = c.retrained.losses.numpy()
        for k in ks:
            gap = np.abs(c.estimates[k].losses.numpy() - measured)
            ax_l.semilogy(t, np.where(gap > 0, gap, np.nan), color=COLORS[k], lw=1.2, label=_label(k))
        ax_l.set_xlabel("step t")
        ax_l.set_ylabel("|Taylor estimate - measured| (nats / char)")
        ax_l.set_title(f"loss of the batch taken at step t\n'{result['order']}', Kendall distance {c.kendall:.2f}, "
                       f"lr {result['lr']:.0e}", fontsize=9)
        ax_l.legend(fontsize=7)

        keys = ["reference", "retrained", *ks]
        values = [c.heldout[k] for k in keys]
        names = ["reference", "retrained", *[f"order {k}" for k in ks]]
        ax_h.tick_params(axis="x", labelsize=8)
        finite = [v for v in values if math.isfinite(v)]
        ax_h.bar(names, [v if math.isfinite(v) else 0 for v in values], color=[COLORS[k] for k in keys])
        for i, v in enumerate(values):
            ax_h.text(i, v if math.isfinite(v) else 0, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
        low, high = min(finite), max(finite)
        pad = max(high - low, 0.01)
        ax_h.set_ylim(low - pad, high + 0.6 * pad)
        ax_h.set_ylabel("held-out loss after training (nats / char)")
        ax_h.set_title(f"held-out loss; the order moved it by {c.heldout_change:.4f}", fontsize=9)
        fig.tight_layout()
        return fig
