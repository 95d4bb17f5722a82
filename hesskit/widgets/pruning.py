"""Notebook 13 (`13_obs_and_mfac_pruning.ipynb`): the pruning explorer, one-shot magnitude, OBD
and OBS pruning of a trained model with OBS's settings as controls.

The curves and the model it prunes come from `hesskit.experiments.pruning` (`Curve`,
`train_digits_mlp`), the scores from `hesskit.experiments.tasks.evaluate`; this module holds the
controls, the cached OBS inverses and the drawing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress, prune
from ..experiments.pruning import Curve, layer_weights
from ..experiments.tasks import evaluate
from .explorer import Explorer

__all__ = ["PruningExplorer"]

LABELS = {"magnitude": "magnitude", "obd": "OBD", "obs": "OBS one-shot", "path": "OBS, recomputed"}
COLORS = {"magnitude": "tab:gray", "obd": "tab:orange", "obs": "tab:blue", "path": "tab:red"}
METHOD_OPTIONS = (("magnitude", "magnitude"), ("OBD", "obd"), ("OBS (M-FAC / WoodFisher)", "obs"))


class PruningExplorer(Explorer):
    """One-shot pruning of a trained model: the sparsity, the method whose pruned model is shown,
    and OBS's number of gradients m, damping and block size. Left: test accuracy against sparsity
    for magnitude, OBD and one-shot OBS at the chosen settings (plus an optional fixed curve, e.g.
    `obs_path`'s OBS with recomputations), with the chosen point; right: the per-layer sparsity of
    the chosen pruned model.

    Everything that does not depend on a control is computed in `__init__`: all per-sample
    gradients of `data` at the trained weights, the OBD diagonal, and the magnitude and OBD curves.
    OBS's window of m gradients is the first m of a seeded permutation, exactly the samples
    `hk.prune.obs(..., num_grads=m, seed=seed)` draws; one `FisherInverse` per (m, damping, block)
    serves the whole curve and is cached. `grads` holds the per-sample gradients of `data` in
    that seeded order.
    """

    def __init__(self, model: nn.Module, criterion: Any, data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                 sparsities: Sequence[float] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95), *,
                 sparsity: float = 0.8, method: str = "obs", num_grads: int = 256, damping: float = 1e-5,
                 block_size: int | None = 128, grad_options: Sequence[int] = (16, 32, 64, 128, 256),
                 block_options: Sequence[int] = (1, 8, 32, 128, 512), obd_curvature: str = "hessian",
                 num_matvecs: int = 100, seed: int = 0, reference: Curve | None = None,
                 reference_label: str = "path", reference_name: str = "OBS with recomputations (fixed settings)"):
        import ipywidgets as widgets

        self.model, self.criterion, self.data, self.test = model, criterion, data, test
        self.grid = np.asarray(sorted(float(s) for s in sparsities))
        self.seed = int(seed)
        self.reference, self.reference_label, self.reference_name = reference, reference_label, reference_name
        self.num_weights = sum(w.numel() for w in layer_weights(model))
        self.layer_sizes = prune.sparsity(model).sizes
        grads = prune.per_sample_gradients(model, criterion, data)
        if isinstance(num_grads, bool) or not isinstance(num_grads, int) or not 1 <= num_grads <= len(grads):
            raise ValueError(f"num_grads: expected an integer in 1..{len(grads)} (the samples in data), "
                             f"got {num_grads!r}")
        order = torch.randperm(len(grads), generator=torch.Generator().manual_seed(self.seed))
        self.grads = grads[order]  # the first m rows: the samples hk.prune.obs(num_grads=m, seed=seed) uses
        grad_options = sorted({int(m) for m in grad_options if 1 <= int(m) <= len(grads)} | {int(num_grads)})
        blocks = [(str(int(c)), int(c)) for c in sorted(set(block_options)) if int(c) < self.num_weights]
        blocks.append((f"none (all {self.num_weights:,})", self.num_weights))
        block_value = self.num_weights if block_size is None or block_size >= self.num_weights else int(block_size)
        if block_value not in [v for _, v in blocks]:
            blocks.insert(0, (str(block_value), block_value))
            blocks.sort(key=lambda item: item[1])
        self._diag = prune.obd_diagonal(model, criterion, data, obd_curvature, num_matvecs=num_matvecs, seed=self.seed)
        self.obd_curvature = obd_curvature
        self.curve = Curve(dense=evaluate(model, test, criterion))
        self.curve.add("magnitude", self.grid, [prune.magnitude(model, s) for s in self.grid], criterion, test, 0.0)
        self.curve.add("obd", self.grid, [prune.obd(model, criterion, data, s, curvature=self._diag)
                                          for s in self.grid], criterion, test, 0.0)
        self._inverses: dict[tuple, prune.FisherInverse] = {}
        self._obs_curves: dict[tuple, Curve] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "sparsity": widgets.FloatSlider(value=sparsity, min=0.05, max=0.95, step=0.05, description="sparsity",
                                            readout_format=".2f", continuous_update=False, style=style),
            "method": widgets.Dropdown(options=METHOD_OPTIONS, value=method, description="method", style=style),
            "num_grads": widgets.SelectionSlider(options=grad_options, value=int(num_grads),
                                                 description="gradients m", continuous_update=False, style=style),
            "damping": widgets.FloatLogSlider(value=damping, base=10, min=-9, max=0, step=0.5, description="damping λ",
                                              readout_format=".0e", continuous_update=False, style=style),
            "block_size": widgets.Dropdown(options=blocks, value=block_value, description="block size c",
                                           style=style),
        })

    @staticmethod
    def _key(num_grads: int, damping: float, block_size: int) -> tuple:
        return (int(num_grads), float(f"{damping:.6g}"), int(block_size))

    def inverse(self, num_grads: int, damping: float, block_size: int) -> prune.FisherInverse:
        """The (cached) block-diagonal inverse damped empirical Fisher of the first m gradients."""
        key = self._key(num_grads, damping, block_size)
        if key not in self._inverses:
            block = None if block_size >= self.num_weights else int(block_size)
            self._inverses[key] = prune.FisherInverse(self.grads[: int(num_grads)], float(damping), block)
        return self._inverses[key]

    def prune(self, method: str, sparsity: float, num_grads: int, damping: float, block_size: int) -> nn.Module:
        """The model pruned one-shot by `method` (OBS with the cached inverse of these settings)."""
        if method == "magnitude":
            return prune.magnitude(self.model, sparsity)
        if method == "obd":
            return prune.obd(self.model, self.criterion, self.data, sparsity, curvature=self._diag)
        return prune.obs_with_inverse(self.model, self.inverse(num_grads, damping, block_size), sparsity)

    def compute(self, sparsity: float, method: str, num_grads: int, damping: float, block_size: int) -> dict:
        sparsity = float(round(sparsity, 4))
        key = self._key(num_grads, damping, block_size)
        if key not in self._obs_curves:
            curve = Curve()
            start = time.perf_counter()
            units = len(self.grid) + 1  # progress: the inverse, then one unit per sparsity of the curve
            progress.report(0, units, "OBS: block inverse")
            inverse = self.inverse(num_grads, damping, block_size)
            models = []
            for k, s in enumerate(self.grid, start=1):
                progress.report(k, units, "OBS curve: sparsity")  # the inverse is done: unit 1
                models.append(prune.obs_with_inverse(self.model, inverse, s))
            progress.report(units, units, "OBS curve: sparsity")
            curve.add("obs", self.grid, models, self.criterion, self.test, time.perf_counter() - start)
            self._obs_curves[key] = curve
        obs_curve = self._obs_curves[key]
        pruned = self.prune(method, sparsity, num_grads, damping, block_size)
        metrics = evaluate(pruned, self.test, self.criterion)
        loss, accuracy = metrics.loss, metrics.accuracy
        report = prune.sparsity(pruned)
        return {
            "sparsity": sparsity, "method": method, "num_grads": int(num_grads), "damping": float(damping),
            "block_size": int(block_size), "accuracy": accuracy, "loss": loss, "layers": report.layers,
            "overall": report.overall, "zeros": report.zeros, "obs_curve": obs_curve,
            "at_sparsity": {other: accuracy if other == method else evaluate(
                self.prune(other, sparsity, num_grads, damping, block_size), self.test, self.criterion).accuracy
                for other in ("magnitude", "obd", "obs")},
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11.5, 4.6))
        ax, ax_layers = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
        fig.subplots_adjust(left=0.065, right=0.985, bottom=0.13, top=0.9, wspace=0.28)
        self._draw_curves(ax, result)
        self._draw_layers(ax_layers, result)
        return fig

    def _draw_curves(self, ax, result: dict) -> None:
        """Test accuracy against sparsity for every method (and the reference curve), the chosen point."""
        c = self.curve
        obd_label = {"hessian": "Hessian", "ggn": "GGN", "empirical_fisher": "empirical Fisher"}[self.obd_curvature]
        block = "none" if result["block_size"] >= self.num_weights else result["block_size"]
        lines = [("magnitude", c, "magnitude (no curvature, no update)"),
                 ("obd", c, f"OBD (diag. of the {obd_label}, no update)"),
                 ("obs", result["obs_curve"],
                  f"OBS one-shot (m {result['num_grads']}, λ {result['damping']:.0e}, block {block})")]
        for key, curve, label in lines:
            ax.plot(100 * curve.sparsities[key], 100 * curve.accuracy[key], "o-", color=COLORS[key], lw=2, ms=4,
                    label=label)
        if self.reference is not None and self.reference_label in self.reference.accuracy:
            r = self.reference
            ax.plot(100 * r.sparsities[self.reference_label], 100 * r.accuracy[self.reference_label], "s--",
                    color=COLORS["path"], lw=1.5, ms=3, label=self.reference_name)
        ax.axhline(100 * c.dense.accuracy, color="k", lw=0.8, ls=":", label=f"dense model ({c.dense.percent:.1f}%)")
        ax.axhline(10, color="0.6", lw=0.8, ls="-.", label="chance (10%)")
        ax.plot([100 * result["sparsity"]], [100 * result["accuracy"]], "*", ms=16, mec="k",
                color=COLORS[result["method"]], zorder=5, label=f"chosen: {100 * result['accuracy']:.1f}%")
        ax.set_xlabel(f"sparsity (% of the {self.num_weights:,} Linear weights set to zero)")
        ax.set_ylabel(f"test accuracy (%, {len(self.test[0])} digits)")
        ax.set_ylim(0, 100)
        ax.set_xlim(100 * min(self.grid[0], result["sparsity"]) - 3, 100 * max(self.grid[-1], result["sparsity"]) + 3)
        a = result["at_sparsity"]
        ax.set_title(f"one-shot pruning at {100 * result['sparsity']:.0f}%: magnitude {100 * a['magnitude']:.1f}%, "
                     f"OBD {100 * a['obd']:.1f}%, OBS {100 * a['obs']:.1f}%", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)

    def _draw_layers(self, ax_layers, result: dict) -> None:
        """The per-layer sparsity of the chosen pruned model."""
        names = list(result["layers"])
        values = [100 * result["layers"][n] for n in names]
        labels = [f"layer {n}\n{self.layer_sizes[n]:,} weights" for n in names]
        bars = ax_layers.bar(range(len(names)), values, color=COLORS[result["method"]], alpha=0.8)
        for bar, v in zip(bars, values):
            ax_layers.text(bar.get_x() + bar.get_width() / 2, v / 2, f"{v:.0f}%", ha="center", va="center",
                           fontsize=10, color="white" if v > 8 else "k")
        ax_layers.axhline(100 * result["overall"], color="k", lw=1, ls="--",
                          label=f"overall {100 * result['overall']:.0f}%")
        ax_layers.set_xticks(range(len(names)), labels, fontsize=8)
        ax_layers.set_ylim(0, 110)
        ax_layers.set_xlabel("Linear layer (module name in the MLP)")
        ax_layers.set_ylabel("weights pruned in the layer (%)")
        method_name = dict((v, k) for k, v in METHOD_OPTIONS)[result["method"]]
        ax_layers.set_title(f"per-layer sparsity: {method_name}", fontsize=10)
        ax_layers.legend(fontsize=8, loc="upper right")
        ax_layers.grid(alpha=0.3, axis="y")
