"""Notebook 13: Optimal Brain Surgeon and M-FAC pruning on a digits MLP.

The experiments behind the notebook, written as plain functions so that a benchmark can reuse them:

* `train_digits_mlp`: the model (64-128-64-10 tanh by default) trained in a second, seeded;
* `evaluate`: mean loss and accuracy of a model on one (x, y) batch;
* `one_shot_curve`: magnitude, OBD and one-shot OBS (WoodFisher / M-FAC) at a list of sparsities,
  each method's curvature computed ONCE and reused for every sparsity;
* `obs_path`: OBS with recomputations (M-FAC's `nrecomps`) as ONE trajectory: after step j of a
  J-step run to sparsity s the model is exactly `hk.prune.obs(..., s_j, num_recomputations=j)`;
* `compensation_ablation`: ranking (magnitude or OBS saliency) x update (none or OBS);
* `obs_sweep`: how the number of gradients m, the damping and the block size change OBS;
* `PruningExplorer`: the widget.

References: LeCun, Denker & Solla, "Optimal brain damage", NeurIPS 1990; Hassibi & Stork, "Second
order derivatives for network pruning: Optimal brain surgeon", NeurIPS 1993; Singh & Alistarh,
"WoodFisher", NeurIPS 2020; Frantar, Kurtic & Alistarh, "M-FAC", NeurIPS 2021.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import prune
from ..data import digits
from ..models import MLP
from .explorer import Explorer
from .. import progress

__all__ = [
    "PruningExplorer",
    "Curve",
    "train_digits_mlp",
    "evaluate",
    "layer_weights",
    "one_shot_curve",
    "obs_path",
    "path_sparsities",
    "compensation_ablation",
    "obs_sweep",
]

LABELS = {"magnitude": "magnitude", "obd": "OBD", "obs": "OBS one-shot", "path": "OBS, recomputed"}
COLORS = {"magnitude": "tab:gray", "obd": "tab:orange", "obs": "tab:blue", "path": "tab:red"}


# --------------------------------------------------------------------------- model and metrics
def train_digits_mlp(hidden: tuple[int, ...] = (128, 64), steps: int = 50, lr: float = 1e-2, seed: int = 0,
                     activation: str = "tanh") -> tuple[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """`hk.models.MLP(64, hidden, 10, activation)` on the flattened digits, initialised after
    `torch.manual_seed(seed)` and trained with `steps` full-batch AdamW steps (lr 0.01, torch's
    weight decay 0.01) on the 1,438 training digits: for (128, 64), 50 steps give about 97% test
    accuracy at a training loss of about 0.015 (stopped early on purpose: at a loss of 0.001 the
    per-sample gradients, and with them the empirical Fisher, all but vanish). Returns
    (model in eval mode, (x, y) training digits, (x, y) test digits)."""
    (x, y), (x_test, y_test) = digits(flatten=True, seed=seed)
    torch.manual_seed(seed)
    model = MLP(64, tuple(hidden), 10, activation=activation)
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), (x, y), (x_test, y_test)


def evaluate(model: nn.Module, criterion: Any, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on one (x, y) batch, in eval mode (the mode is restored)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(data[0])
            return float(criterion(logits, data[1])), float((logits.argmax(dim=1) == data[1]).double().mean())
    finally:
        model.train(training)


def layer_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights `hk.prune` prunes by default (Linear and Conv layers), in order."""
    return [m.weight for m in prune.prunable_layers(model).values()]


# --------------------------------------------------------------------------- curves
@dataclass
class Curve:
    """Test accuracy and loss of pruned models: `accuracy[label][i]` at `sparsities[label][i]`;
    `layers[label][i]` is the per-layer sparsity (`hk.prune.sparsity(...).layers`), `seconds[label]`
    the time spent pruning (curvature included), `dense` the unpruned (loss, accuracy)."""

    sparsities: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    loss: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    dense: tuple[float, float] = (math.nan, math.nan)

    def add(self, label: str, sparsities: Sequence[float], models: Sequence[nn.Module], criterion: Any,
            test: tuple[Tensor, Tensor], seconds: float) -> None:
        scores = [evaluate(m, criterion, test) for m in models]
        self.sparsities[label] = np.asarray(sparsities, dtype=float)
        self.loss[label] = np.array([s[0] for s in scores])
        self.accuracy[label] = np.array([s[1] for s in scores])
        self.layers[label] = [prune.sparsity(m).layers for m in models]
        self.seconds[label] = float(seconds)

    def at(self, label: str, sparsity: float) -> float:
        """The accuracy of `label` at the given sparsity (the nearest one computed)."""
        i = int(np.argmin(np.abs(self.sparsities[label] - sparsity)))
        return float(self.accuracy[label][i])


def one_shot_curve(model: nn.Module, criterion: Any, data: Any, test: tuple[Tensor, Tensor],
                   sparsities: Sequence[float], methods: Sequence[str] = ("magnitude", "obd", "obs"), *,
                   num_grads: int | None = None, damping: float = 1e-5, block_size: int | None = 128,
                   obd_curvature: str = "hessian", num_matvecs: int = 100, seed: int = 0) -> Curve:
    """Prune `model` once to each sparsity with each method and evaluate on `test`.

    Each method's curvature is computed once and reused for all sparsities, which gives the same
    models as calling `hk.prune` per sparsity: "obd" ranks by `obd_diagonal(obd_curvature)`, "obs"
    uses one `FisherInverse.from_model(num_grads, damping, block_size, seed)` with
    `hk.prune.obs_with_inverse` (= `hk.prune.obs(..., num_recomputations=1, seed=seed)`)."""
    curve = Curve(dense=evaluate(model, criterion, test))
    for k, method in enumerate(methods):
        progress.report(k, len(methods), f"one-shot curve ({method})")  # shown while an explorer renders
        start = time.perf_counter()
        if method == "magnitude":
            models = [prune.magnitude(model, s) for s in sparsities]
        elif method == "obd":
            diag = prune.obd_diagonal(model, criterion, data, obd_curvature, num_matvecs=num_matvecs, seed=seed)
            models = [prune.obd(model, criterion, data, s, curvature=diag) for s in sparsities]
        elif method == "obs":
            inverse = prune.FisherInverse.from_model(model, criterion, data, num_grads=num_grads, damping=damping,
                                                     block_size=block_size, seed=seed)
            models = [prune.obs_with_inverse(model, inverse, s) for s in sparsities]
        else:
            raise ValueError(f"methods: expected 'magnitude', 'obd' or 'obs', got {method!r}")
        curve.add(method, sparsities, models, criterion, test, time.perf_counter() - start)
    progress.report(len(methods), len(methods), "one-shot curve")
    return curve


def path_sparsities(sparsity: float, steps: int) -> np.ndarray:
    """The targets s_j = 1 - (1 - s)^(j / steps), j = 1..steps, that OBS with `steps` recomputations
    passes through from a dense model (the density shrinks by the same factor every step)."""
    j = np.arange(1, steps + 1)
    return 1 - (1 - sparsity) ** (j / steps)


def obs_path(model: nn.Module, criterion: Any, data: Any, test: tuple[Tensor, Tensor], sparsity: float,
             steps: int = 16, *, num_grads: int | None = 256, damping: float = 1e-5, block_size: int | None = 128,
             seed: int = 0, saliency: str = "obs", update: bool = True, label: str = "path",
             curve: Curve | None = None) -> Curve:
    """OBS with `steps` recomputations to `sparsity`, recorded after every step (M-FAC's `nrecomps`).

    Step j prunes the previous model to `path_sparsities(sparsity, steps)[j-1]` with one
    `hk.prune.obs` step on gradients recomputed at the current weights (samples drawn with seed
    `seed + j - 1`), so the model after step j is exactly `hk.prune.obs(model, ..., s_j,
    num_recomputations=j, seed=seed)`, and the last one is the J-step result: one run gives the
    whole curve. Added to `curve` (a new one if None) under `label`."""
    curve = Curve(dense=evaluate(model, criterion, test)) if curve is None else curve
    start = time.perf_counter()
    targets = path_sparsities(sparsity, steps)
    models, current = [], model
    for j, target in enumerate(targets):
        current = prune.obs(current, criterion, data, float(target), num_grads=num_grads, damping=damping,
                            block_size=block_size, seed=seed + j, saliency=saliency, update=update)
        models.append(current)
        progress.report(j + 1, len(targets), "OBS recomputation")  # shown while an explorer renders
    curve.add(label, targets, models, criterion, test, time.perf_counter() - start)
    return curve


def compensation_ablation(model: nn.Module, criterion: Any, data: Any, test: tuple[Tensor, Tensor],
                          sparsities: Sequence[float], *, steps: int = 1, num_grads: int | None = 256,
                          damping: float = 1e-5, block_size: int | None = 128,
                          seed: int = 0) -> dict[tuple, np.ndarray]:
    """Test accuracy at each sparsity for ranking in {"magnitude", "obs"} x update in {False, True},
    with `steps` recomputations (`hk.prune.obs(saliency=..., update=..., num_recomputations=steps)`).
    ("magnitude", False) is magnitude pruning, ("obs", True) is OBS; the other two isolate the
    saliency and the compensating update."""
    out = {}
    units, done = 4 * len(sparsities), 0  # progress, shown while an explorer renders: one unit per pruned model
    for saliency in ("magnitude", "obs"):
        for update in (False, True):
            accuracies = []
            for s in sparsities:
                pruned = prune.obs(model, criterion, data, s, num_grads=num_grads, damping=damping,
                                   block_size=block_size, num_recomputations=steps, seed=seed, saliency=saliency,
                                   update=update)
                accuracies.append(evaluate(pruned, criterion, test)[1])
                done += 1
                progress.report(done, units, "pruned model")
            out[(saliency, update)] = np.array(accuracies)
    return out


def obs_sweep(model: nn.Module, criterion: Any, data: Any, test: tuple[Tensor, Tensor], sparsity: float,
              name: str, values: Sequence[Any], *, steps: int = 1, num_grads: int | None = 256,
              damping: float = 1e-5, block_size: int | None = 128, seed: int = 0) -> np.ndarray:
    """Test accuracy of `hk.prune.obs` at `sparsity` with `steps` recomputations, for each value of
    the setting `name` ("num_grads", "damping" or "block_size"; the others as given)."""
    if name not in ("num_grads", "damping", "block_size"):
        raise ValueError(f"name: expected 'num_grads', 'damping' or 'block_size', got {name!r}")
    settings = dict(num_grads=num_grads, damping=damping, block_size=block_size)
    accuracies = []
    for k, value in enumerate(values, start=1):
        settings[name] = value
        pruned = prune.obs(model, criterion, data, sparsity, num_recomputations=steps, seed=seed, **settings)
        accuracies.append(evaluate(pruned, criterion, test)[1])
        progress.report(k, len(values), f"OBS, {name}")  # shown while an explorer renders
    return np.array(accuracies)


# --------------------------------------------------------------------------- widget
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
    serves the whole curve and is cached.
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
        self._grads = grads[order]  # the first m rows: the samples hk.prune.obs(num_grads=m, seed=seed) uses
        grad_options = sorted({int(m) for m in grad_options if 1 <= int(m) <= len(grads)} | {int(num_grads)})
        blocks = [(str(int(c)), int(c)) for c in sorted(set(block_options)) if int(c) < self.num_weights]
        blocks.append((f"none (all {self.num_weights:,})", self.num_weights))
        block_value = self.num_weights if block_size is None or block_size >= self.num_weights else int(block_size)
        if block_value not in [v for _, v in blocks]:
            blocks.insert(0, (str(block_value), block_value))
            blocks.sort(key=lambda item: item[1])
        self._diag = prune.obd_diagonal(model, criterion, data, obd_curvature, num_matvecs=num_matvecs, seed=self.seed)
        self.obd_curvature = obd_curvature
        self.curve = Curve(dense=evaluate(model, criterion, test))
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
            self._inverses[key] = prune.FisherInverse(self._grads[: int(num_grads)], float(damping), block)
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
        loss, accuracy = evaluate(pruned, self.criterion, self.test)
        report = prune.sparsity(pruned)
        return {
            "sparsity": sparsity, "method": method, "num_grads": int(num_grads), "damping": float(damping),
            "block_size": int(block_size), "accuracy": accuracy, "loss": loss, "layers": report.layers,
            "overall": report.overall, "zeros": report.zeros, "obs_curve": obs_curve,
            "at_sparsity": {
                "magnitude": evaluate(prune.magnitude(self.model, sparsity), self.criterion, self.test)[1]
                if method != "magnitude" else accuracy,
                "obd": evaluate(self.prune("obd", sparsity, num_grads, damping, block_size), self.criterion,
                                self.test)[1] if method != "obd" else accuracy,
                "obs": evaluate(self.prune("obs", sparsity, num_grads, damping, block_size), self.criterion,
                                self.test)[1] if method != "obs" else accuracy,
            },
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11.5, 4.6))
        ax, ax_layers = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
        fig.subplots_adjust(left=0.065, right=0.985, bottom=0.13, top=0.9, wspace=0.28)
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
        ax.axhline(100 * c.dense[1], color="k", lw=0.8, ls=":", label=f"dense model ({100 * c.dense[1]:.1f}%)")
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
        return fig
