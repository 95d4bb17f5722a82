"""Notebook 13 (`13_obs_and_mfac_pruning.ipynb`): Optimal Brain Surgeon and M-FAC pruning on a
digits MLP.

The experiments behind the notebook, written as plain functions so that a benchmark can reuse them:

* `train_digits_mlp`: the model (64-128-64-10 tanh by default) trained in a second, seeded (every
  score here is `hesskit.experiments.tasks.evaluate`'s `Metrics`);
* `one_shot_curve`: magnitude, OBD and one-shot OBS (WoodFisher / M-FAC) at a list of sparsities,
  each method's curvature computed ONCE and reused for every sparsity;
* `obs_path`: OBS with recomputations (M-FAC's `nrecomps`) as ONE trajectory: after step j of a
  J-step run to sparsity s the model is exactly `hk.prune.obs(..., s_j, num_recomputations=j)`;
* `compensation_ablation`: ranking (magnitude or OBS saliency) x update (none or OBS);
* `obs_sweep`: how the number of gradients m, the damping and the block size change OBS.

The explorer is `hesskit.widgets.pruning.PruningExplorer`.

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
from torch import Tensor, nn

from .. import progress, prune
from ..data import digits
from .tasks import Metrics, TrainedModel, digits_mlp, evaluate, trained_classifier

__all__ = [
    "Curve",
    "train_digits_mlp",
    "layer_weights",
    "one_shot_curve",
    "obs_path",
    "path_sparsities",
    "compensation_ablation",
    "obs_sweep",
]


# --------------------------------------------------------------------------- model and metrics
def train_digits_mlp(hidden: tuple[int, ...] = (128, 64), steps: int = 50, lr: float = 1e-2, seed: int = 0,
                     activation: str = "tanh") -> TrainedModel:
    """`tasks.digits_mlp(hidden, activation, seed)` on the flattened digits, trained by
    `tasks.trained_classifier` with `steps` full-batch AdamW steps (lr 0.01, torch's weight decay
    0.01) on the 1,438 training digits: for (128, 64), 50 steps give about 97% test
    accuracy at a training loss of about 0.015 (stopped early on purpose: at a loss of 0.001 the
    per-sample gradients, and with them the empirical Fisher, all but vanish). Returns a
    `tasks.TrainedModel` (the model in eval mode, the (x, y) training and test digits)."""
    train, test = digits(flatten=True, seed=seed)
    return trained_classifier(digits_mlp(hidden, activation, seed), train, test, steps, lr, optimizer="adamw",
                              seed=seed, hidden=tuple(hidden), activation=activation)


def layer_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights `hk.prune` prunes by default (Linear and Conv layers), in order."""
    return [m.weight for m in prune.prunable_layers(model).values()]


# --------------------------------------------------------------------------- curves
@dataclass
class Curve:
    """Test accuracy and loss of pruned models: `accuracy[label][i]` at `sparsities[label][i]`;
    `layers[label][i]` is the per-layer sparsity (`hk.prune.sparsity(...).layers`), `seconds[label]`
    the time spent pruning (curvature included), `dense` the unpruned model's `Metrics` (loss, accuracy)."""

    sparsities: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    loss: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    dense: Metrics = Metrics(math.nan, math.nan)

    def add(self, label: str, sparsities: Sequence[float], models: Sequence[nn.Module], criterion: Any,
            test: tuple[Tensor, Tensor], seconds: float) -> None:
        scores = [evaluate(m, test, criterion) for m in models]
        self.sparsities[label] = np.asarray(sparsities, dtype=float)
        self.loss[label] = np.array([s.loss for s in scores])
        self.accuracy[label] = np.array([s.accuracy for s in scores])
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
    curve = Curve(dense=evaluate(model, test, criterion))
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
    curve = Curve(dense=evaluate(model, test, criterion)) if curve is None else curve
    start = time.perf_counter()
    targets = path_sparsities(sparsity, steps)
    models, current = [], model
    for j, target in enumerate(targets):
        current = prune.obs(current, criterion, data, float(target), num_grads=num_grads, damping=damping,
                            block_size=block_size, num_recomputations=1, seed=seed + j, saliency=saliency,
                            update=update)
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
                accuracies.append(evaluate(pruned, test, criterion).accuracy)
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
        accuracies.append(evaluate(pruned, test, criterion).accuracy)
        progress.report(k, len(values), f"OBS, {name}")  # shown while an explorer renders
    return np.array(accuracies)
