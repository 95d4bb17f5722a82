"""Notebook 04 (`04_loss_landscape_and_sharpness.ipynb`): loss landscapes along Hessian eigenvectors,
and the sharpness that training selects.

Studies: the notebook's problem (`digits_problem`: a tanh MLP, its square loss and digits, in
float64); slices of the loss along directions in parameter space (`random_direction`,
`loss_along`, `second_difference`); the sharpness lambda_max by a low-budget Lanczos run
(`sharpness`); plain (S)GD that records the sharpness and the trace of the full-batch Hessian
(`train`, `SharpnessRun`); and a sweep over learning rates and batch sizes (`sweep`). The
notebook's explorer is `hesskit.widgets.sharpness.SharpnessExplorer`.

References: Li, Xu, Taylor, Studer & Goldstein, "Visualizing the loss landscape of neural nets",
NeurIPS 2018 (slices, filter normalisation); Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient
descent on neural networks typically occurs at the edge of stability", ICLR 2021; Wu, Ma & E,
"How SGD selects the global minima in over-parameterized learning: a dynamical stability
perspective", NeurIPS 2018; Ma & Ying, "On linear stability of SGD and input-smoothness of
neural networks", NeurIPS 2021.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from ..curvature.eigen import eigenvalues
from ..curvature.operators import HessianOperator
from ..curvature.trace import trace

__all__ = [
    "SharpnessRun",
    "digits_problem",
    "random_direction",
    "loss_along",
    "second_difference",
    "sharpness",
    "train",
    "sweep",
]


# --------------------------------------------------------------------------- the problem
def digits_problem(num_samples: int = 256, hidden: tuple[int, ...] = (16, 16), seed: int = 0):
    """A tanh MLP (64 -> hidden -> 10), its square loss and `num_samples` digits, in float64.

    The loss is `nn.MSELoss()` on one-hot targets, L = (1/10N) sum_i ||f(x_i) - e_{y_i}||^2: the
    square loss of Cohen et al. (2021) and of the SGD stability theory (Wu, Ma & E 2018).
    Returns (model, criterion, (x, targets)); the model's initialisation is fixed by `seed`.
    """
    from ..data import digits
    from ..models import MLP

    (x, y), _ = digits(flatten=True, seed=0)
    if not 1 <= num_samples <= len(x):
        raise ValueError(f"num_samples: expected 1..{len(x)}, got {num_samples}")
    x = x[:num_samples].double()
    targets = nn.functional.one_hot(y[:num_samples], 10).double()
    torch.manual_seed(seed)
    model = MLP(64, tuple(hidden), 10, activation="tanh").double()
    return model, nn.MSELoss(), (x, targets)


def _flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflatten(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    names, params = zip(*model.named_parameters())
    chunks = torch.split(theta, [p.numel() for p in params])
    return {k: c.view_as(p) for k, c, p in zip(names, chunks, params)}


# --------------------------------------------------------------------------- directions and slices
def random_direction(model: nn.Module, normalization: str = "unit", seed: int = 0) -> Tensor:
    """A random Gaussian direction in parameter space, as a flat vector.

    normalization="unit": scaled to norm 1, so the second derivative of the loss along it is
    d^T H d, directly comparable with the Hessian's eigenvalues.
    normalization="filter": each row of each weight matrix (one output unit, a "filter") is
    scaled to the norm of the same row of the weights, and bias directions are zeroed (Li et al.
    2018): pictures become comparable across networks whose weights have different scales.
    """
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for name, p in model.named_parameters():
        d = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
        if normalization == "filter":
            if p.dim() <= 1:
                d = torch.zeros_like(d)
            else:
                rows_d = d.reshape(len(d), -1)
                rows_p = p.detach().reshape(len(p), -1)
                d = (rows_d * (rows_p.norm(dim=1) / rows_d.norm(dim=1).clamp_min(1e-12))[:, None]).view_as(p)
        elif normalization != "unit":
            raise ValueError(f"normalization: expected 'unit' or 'filter', got {normalization!r}")
        parts.append(d.reshape(-1))
    d = torch.cat(parts)
    return d / d.norm() if normalization == "unit" else d


@torch.no_grad()
def loss_along(model: nn.Module, criterion, data, directions, alphas) -> Tensor:
    """The loss on a 1-D or 2-D slice through the model's current parameters theta.

    directions: one flat vector d (n,) -> returns L(theta + a d) for a in alphas, shape (len(alphas),);
    two vectors, as an (n, 2) tensor or a pair -> returns the grid
    L(theta + a_i d1 + a_j d2), shape (len(alphas), len(alphas)) (rows: d1, columns: d2).
    data: one (inputs, targets) batch or a list of them (the mean loss over all samples).
    The model is not modified.
    """
    theta = _flat(model.parameters())
    alphas = torch.as_tensor(np.asarray(alphas), dtype=theta.dtype)
    if isinstance(directions, (tuple, list)):
        directions = torch.stack([torch.as_tensor(d) for d in directions], dim=1)
    D = directions.to(theta).reshape(len(theta), -1)
    if D.shape[1] not in (1, 2):
        raise ValueError(f"directions: expected one or two directions, got {D.shape[1]}")
    batches = [data] if isinstance(data, tuple) else list(data)

    def loss_at(point: Tensor) -> float:
        weights = _unflatten(model, point)
        total, count = 0.0, 0
        for inputs, targets in batches:
            out = torch.func.functional_call(model, weights, (inputs,))
            total += criterion(out, targets).item() * len(inputs)
            count += len(inputs)
        return total / count

    if D.shape[1] == 1:
        return torch.tensor([loss_at(theta + a * D[:, 0]) for a in alphas], dtype=torch.float64)
    return torch.tensor([[loss_at(theta + a * D[:, 0] + b * D[:, 1]) for b in alphas] for a in alphas],
                        dtype=torch.float64)


def second_difference(model: nn.Module, criterion, data, direction: Tensor, h: float = 1e-3) -> float:
    """(L(theta + h d) - 2 L(theta) + L(theta - h d)) / h^2, which tends to d^T H d as h -> 0.

    The gradient term cancels in the central difference, so this measures curvature even away
    from a minimum; for a unit eigenvector d of H it is the eigenvalue (error O(h^2)).
    """
    minus, zero, plus = loss_along(model, criterion, data, direction, [-h, 0.0, h]).tolist()
    return (plus - 2 * zero + minus) / h**2


def sharpness(op, tol: float = 1e-3, seed: int = 0) -> tuple[float, int]:
    """lambda_max of a curvature operator by a low-budget Lanczos run: (value, products used).

    A converged Ritz pair has residual <= tol * ||H||, so its value is that close to *an*
    eigenvalue; `hk.eigenvalues` runs at least k + 5 products before it accepts convergence, so
    that the top eigenvector has entered the Krylov space. On the notebook's network tol=1e-3
    matches a tight solve to 4 digits for ~11-15 products.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = eigenvalues(op, k=1, which="largest", tol=tol, max_matvecs=100, seed=seed)
    return float(result.values[0]), int(result.num_matvecs)


# --------------------------------------------------------------------------- training with curvature logging
@dataclass
class SharpnessRun:
    """What `train` saw: full-batch loss every step, sharpness and trace at measurement steps."""

    lr: float
    batch_size: int
    loss: np.ndarray  # full-batch training loss before step t, t = 0..steps (shorter if diverged)
    steps: np.ndarray  # steps at which lambda_max was measured
    sharpness: np.ndarray  # lambda_max of the full-batch Hessian at those steps
    trace_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    trace: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trace_stderr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trace_method: str = ""  # the method `hk.trace` reported: its default, "xtrace" ("exact" from n products)
    diverged_at: int | None = None  # the step whose loss became non-finite or exceeded the threshold
    params: Tensor | None = None  # the final parameters, flat
    num_matvecs: int = 0
    wall_time: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def threshold(self) -> float:
        """2 / eta: gradient descent on a quadratic diverges along curvatures above it."""
        return 2.0 / self.lr


def _due(t: int, every: int | None, steps: int) -> bool:
    return t == steps or (every is not None and t % every == 0)


class _Batches:
    """The batches of (S)GD: the whole set at every step (batch_size = n), or each epoch a fresh
    seeded permutation cut into batches of `batch_size` (the last, incomplete one dropped)."""

    def __init__(self, x: Tensor, targets: Tensor, batch_size: int, seed: int):
        self.x, self.targets, self.batch_size = x, targets, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.arange(len(x)), len(x)

    def next(self) -> tuple[Tensor, Tensor]:
        n = len(self.x)
        if self.batch_size == n:
            return self.x, self.targets
        if self.position + self.batch_size > n:
            self.order, self.position = torch.randperm(n, generator=self.gen), 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.x[idx], self.targets[idx]


def _measure(op, t: int, log: dict[str, list], sharp: bool, trace_matvecs: int, tol: float, seed: int) -> int:
    """At step t: lambda_max by `sharpness` (if `sharp`) and the trace by `hk.trace`'s default
    (XTrace) with `trace_matvecs` products (if > 0), appended to `log`. Returns the products spent."""
    used = 0
    if sharp:
        value, used = sharpness(op, tol=tol, seed=seed)
        log["steps"].append(t)
        log["sharpness"].append(value)
    if trace_matvecs:
        estimate = trace(op, num_matvecs=trace_matvecs, seed=seed)
        log["trace_steps"].append(t)
        log["trace"].append(estimate.value)
        log["trace_stderr"].append(estimate.stderr)
        log["trace_method"].append(estimate.method)
        used += trace_matvecs
    return used


def _gd_step(model: nn.Module, criterion, params: list[Tensor], batch: tuple[Tensor, Tensor], lr: float) -> None:
    """theta <- theta - lr * grad L_batch(theta), in place."""
    loss = criterion(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(g, alpha=lr)


def train(model: nn.Module, criterion, data, lr: float, batch_size: int | None = None, steps: int = 500,
          measure_every: int | None = 10, trace_every: int | None = None, trace_matvecs: int = 0,
          tol: float = 1e-3, seed: int = 0, divergence: float = 1e3, measure_from: int = 0,
          progress_of: tuple[str, int, int] | None = None) -> SharpnessRun:
    """Plain (S)GD, theta <- theta - lr * grad L_batch(theta), logging the full-batch curvature.

    `model` is trained in place (pass a copy to keep the initialisation). data = (x, targets) in
    memory; batch_size None or len(x) is full-batch gradient descent, otherwise each epoch is a
    fresh seeded permutation cut into batches (the last, incomplete one dropped).
    Every `measure_every` steps and at the end (only at the end if None), lambda_max of the
    full-batch Hessian is measured by `sharpness` (Lanczos, tolerance `tol`); if trace_matvecs > 0,
    its trace by `hk.trace`'s default, XTrace (Epperly, Tropp & Webber 2024), with that many
    products (at least 4; the jackknife standard error in `trace_stderr`), every `trace_every`
    steps and at the end. No measurement is made before step `measure_from`.
    Training stops, and `diverged_at` is set, when the loss becomes non-finite or exceeds
    `divergence`.
    Every step reports `progress` (a bar in the status line of the explorer that runs it):
    "GD step t/steps" by default; `progress_of` = (label, offset, total) counts this run's steps
    as units offset+1.. of a larger computation (`sweep`).
    """
    x, targets = data
    n = len(x)
    batch_size = n if batch_size is None else int(batch_size)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: expected 1..{n}, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr}")
    params = list(model.parameters())
    fewest = min(4, sum(p.numel() for p in params))  # XTrace: two probes used twice, or n (exact)
    if 0 < trace_matvecs < fewest:  # refused now, not by hk.trace at the first measurement
        raise ValueError(f"trace_matvecs: expected 0 (no trace) or at least {fewest} (XTrace uses two probes "
                         f"twice), got {trace_matvecs}")
    start = time.perf_counter()
    op = HessianOperator(model, criterion, (x, targets))
    batches = _Batches(x, targets, batch_size, seed)
    log: dict[str, list] = {key: [] for key in ("loss", "steps", "sharpness", "trace_steps", "trace", "trace_stderr",
                                                "trace_method")}
    matvecs, diverged_at = 0, None
    mode = "GD" if batch_size == n else f"SGD (batch {batch_size})"
    label, offset, total = progress_of if progress_of is not None else (f"{mode} step", 0, steps)
    for t in range(steps + 1):
        with torch.no_grad():
            full = criterion(model(x), targets).item()
        log["loss"].append(full)
        if not math.isfinite(full) or full > divergence:
            diverged_at = t
            break
        if t >= measure_from:
            matvecs += _measure(op, t, log, _due(t, measure_every, steps),
                                trace_matvecs if _due(t, trace_every, steps) else 0, tol, seed)
        if t == steps:
            break
        _gd_step(model, criterion, params, batches.next(), lr)
        progress.report(offset + t + 1, total, label)  # shown while an explorer renders
    return SharpnessRun(
        lr=float(lr), batch_size=batch_size, loss=np.array(log["loss"]), steps=np.array(log["steps"], dtype=int),
        sharpness=np.array(log["sharpness"]), trace_steps=np.array(log["trace_steps"], dtype=int),
        trace=np.array(log["trace"]), trace_stderr=np.array(log["trace_stderr"]),
        trace_method=log["trace_method"][-1] if log["trace_method"] else "", diverged_at=diverged_at,
        params=_flat(params), num_matvecs=matvecs, wall_time=time.perf_counter() - start,
    )


def sweep(model: nn.Module, criterion, data, lrs, batch_sizes, steps: int = 500, trace_matvecs: int = 60,
          last: int = 3, seed: int = 0) -> dict[str, Any]:
    """Train a copy of `model` (same initialisation, same data order) for every (batch size, lr)
    pair and measure the full-batch Hessian at the end of training.

    lambda_max is measured at the `last` multiples of steps // 10 up to `steps` (the final 20% of
    training for last=3); "sharpness" is their mean and "sharpness_spread" their standard deviation:
    under SGD the iterate, and so its curvature, fluctuates. The trace is estimated once, at the
    end, by `hk.trace`'s default, XTrace, with `trace_matvecs` products ("trace", "trace_stderr").
    "loss" is the final full-batch loss. Arrays have shape (len(batch_sizes), len(lrs)) and are nan
    where training diverged. Progress is reported in training steps over the whole grid.
    """
    lrs, batch_sizes = [float(a) for a in lrs], [int(b) for b in batch_sizes]
    shape = (len(batch_sizes), len(lrs))
    keys = ("sharpness", "sharpness_spread", "trace", "trace_stderr", "loss")
    out: dict[str, Any] = {key: np.full(shape, np.nan) for key in keys}
    total = len(batch_sizes) * len(lrs) * steps
    for i, b in enumerate(batch_sizes):
        for j, lr in enumerate(lrs):
            spacing = max(steps // 10, 1)
            done = (i * len(lrs) + j) * steps
            run = train(copy.deepcopy(model), criterion, data, lr, b, steps=steps, measure_every=spacing,
                        measure_from=steps - (last - 1) * spacing, trace_every=None, trace_matvecs=trace_matvecs,
                        seed=seed, progress_of=(f"sweep (B = {b}, η = {lr:.3g}): step", done, total))
            progress.report(done + steps, total, f"sweep (B = {b}, η = {lr:.3g}): step")  # a diverged run stopped early
            if run.diverged:
                continue
            tail = run.sharpness[-last:]
            out["sharpness"][i, j] = tail.mean()
            out["sharpness_spread"][i, j] = tail.std()
            out["trace"][i, j] = run.trace[-1]
            out["trace_stderr"][i, j] = run.trace_stderr[-1]
            out["loss"][i, j] = run.loss[-1]
    out.update(lrs=np.array(lrs), batch_sizes=np.array(batch_sizes), steps=steps)
    return out
