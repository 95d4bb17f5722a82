"""Notebook 06 (`06_adahessian.ipynb`): AdaHessian, Adam with a Hutchinson estimate of the Hessian's diagonal.

Studies: the digits CNN (`digits_cnn`); the single-probe estimate of the diagonal with and without
averaging over convolution kernels (`diagonal_study`, `DiagonalStudy`, `kernel_mean`); one training
loop shared by AdaHessian, AdamW and SGD (`train`, recorded as a `training.TrainingRun`) and a
learning-rate grid (`tune`: `training.tune` with this setup bound, giving a `training.Tuning`); step
times measured interleaved (`step_costs`, `StepCost`, by `training.interleaved_step_times`); and
what `AdaHessian(lr=0.15)` means in public packages (`IMPLEMENTATIONS`). The notebook's explorer is
`hesskit.widgets.adahessian.AdaHessianExplorer`.

References: Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: An adaptive second order
optimizer for machine learning", AAAI 2021; Hutchinson, "A stochastic estimator of the trace of
the influence matrix for Laplacian smoothing splines", Commun. Stat. Simul. Comput. 1989;
Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer. Math. 2007;
Kingma & Ba, "Adam: A method for stochastic optimization", ICLR 2015;
Loshchilov & Hutter, "Decoupled weight decay regularization", ICLR 2019 (AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..curvature.operators import HessianOperator
from ..models import SmallCNN
from ..optim import AdaHessian, make_closure
from .tasks import evaluate
from . import training
from .training import (TrainingRun, Tuning, interleaved_step_times, iter_random_batches, run_plan, run_to_end,
                       training_steps)

__all__ = [
    "DiagonalStudy",
    "IMPLEMENTATIONS",
    "LABELS",
    "OFFICIAL",
    "OPTIMIZERS",
    "StepCost",
    "digits_cnn",
    "diagonal_study",
    "kernel_mean",
    "step_costs",
    "train",
    "tune",
]

OPTIMIZERS = ("adahessian", "adamw", "sgd")
LABELS = {"adahessian": "AdaHessian", "adamw": "AdamW", "sgd": "SGD"}

# What `AdaHessian(model.parameters(), lr=0.15)` means in three public packages, written as
# hk.optim.AdaHessian settings (the differences that change the trajectory, read from each package's
# source; see hk.optim.AdaHessian's docstring).
IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "official (amirgholami/adahessian)": dict(hessian_power=1.0, eps=1e-4, spatial_average=True),
    "torch-optimizer 0.3.0 defaults": dict(hessian_power=0.5, eps=1e-4, spatial_average=True),
    "pytorch-optimizer 4.1.0 defaults": dict(hessian_power=1.0, eps=1e-16, spatial_average=False),
    "davda54/ada-hessian defaults": dict(hessian_power=1.0, eps=1e-8, spatial_average=False),
}
# The notebook studies the official settings: hk.optim.AdaHessian's own default eps is 1e-3 (measured, see its
# docstring), so every AdaHessian built here starts from these and `settings` override them.
OFFICIAL = IMPLEMENTATIONS["official (amirgholami/adahessian)"]


# --------------------------------------------------------------------------- the problem
def digits_cnn(channels: tuple[int, int] = (4, 8), seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`hk.models.SmallCNN(channels)` (tanh, 2x2 max-pool) for the 8 x 8 digits, initialised after
    `torch.manual_seed(seed)`: (4, 8) channels give 666 parameters."""
    torch.manual_seed(seed)
    return SmallCNN(tuple(channels)).to(dtype)


def kernel_mean(d: Tensor, shape: Sequence[int]) -> Tensor:
    """Average the entries of `d` (a flat block shaped like a parameter, with any trailing batch
    dimensions) over each convolution kernel's spatial positions (every dimension after the first
    two), as AdaHessian's spatial averaging does; 1-D and 2-D parameters are returned as they are."""
    shape = tuple(shape)
    if len(shape) <= 2:
        return d
    extra = d.shape[1:]
    block = d.reshape(*shape, *extra)
    dims = tuple(range(2, len(shape)))
    return block.mean(dim=dims, keepdim=True).expand_as(block).reshape(d.shape)


@dataclass
class DiagonalStudy:
    """Single-probe Hutchinson estimates D = z * (H z) of diag(H) next to the exact Hessian.

    `samples[:, p]` is the estimate of probe p (Rademacher z); `exact` = diag(H); `row_norm[i]` =
    ||H[i, :]||_2. Without averaging, entry i has mean H_ii and variance sum_{j != i} H_ij^2
    (Bekas, Kokiopoulou & Saad 2007), and E[D_i^2] = ||H[i, :]||^2 exactly, since z_i^2 = 1.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    exact: Tensor  # (n,)
    row_norm: Tensor  # (n,)
    samples: Tensor  # (n, P)
    theory_variance: Tensor  # (n,) sum_{j != i} H_ij^2

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            out[name] = slice(start, start + size)
            start += size
        return out

    def conv_names(self) -> list[str]:
        return [n for n, s in zip(self.names, self.shapes) if len(s) > 2]

    def estimates(self, name: str, averaged: bool, absolute: bool = False) -> Tensor:
        """(numel, P) estimates for one parameter: D or |D|, raw or averaged over each kernel."""
        shape = self.shapes[self.names.index(name)]
        d = self.samples[self.slices()[name]]
        d = d.abs() if absolute else d
        return kernel_mean(d, shape) if averaged else d

    def summary(self, name: str, absolute: bool = False) -> dict[str, float]:
        """Mean over the parameter's entries of the per-entry variance and of the mean squared
        error against the exact diagonal (|diag| when `absolute`), raw and averaged, plus the
        squared bias that averaging the exact diagonal itself introduces."""
        sl, shape = self.slices()[name], self.shapes[self.names.index(name)]
        target = self.exact[sl].abs() if absolute else self.exact[sl]
        out = {"signal": float((target**2).mean())}
        for key, averaged in (("raw", False), ("averaged", True)):
            est = self.estimates(name, averaged, absolute)
            out[f"variance_{key}"] = float(est.var(dim=1).mean())
            out[f"mse_{key}"] = float(((est - target[:, None]) ** 2).mean())
        out["bias2_averaged"] = float(((kernel_mean(target, shape) - target) ** 2).mean())
        return out


def diagonal_study(model: nn.Module, criterion: nn.Module, data: tuple[Tensor, Tensor], num_probes: int = 256,
                   seed: int = 0) -> DiagonalStudy:
    """The exact Hessian of `criterion(model(x), y)` (dense, one product per parameter: keep the
    model tiny) and `num_probes` Rademacher estimates z * (H z) of its diagonal (Hutchinson 1989;
    Bekas, Kokiopoulou & Saad 2007), all in the model's dtype."""
    op = HessianOperator(model, criterion, data, mode="eval")
    H = op.dense()
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randint(0, 2, (H.shape[0], num_probes), generator=gen, dtype=torch.float64).mul_(2).sub_(1).to(H.dtype)
    exact = H.diagonal().clone()
    return DiagonalStudy(
        names=list(op.param_names), shapes=[tuple(p.shape) for p in op.params], exact=exact,
        row_norm=H.norm(dim=1), samples=Z * (H @ Z), theory_variance=(H**2).sum(dim=1) - exact**2,
    )


# --------------------------------------------------------------------------- training
def _make_optimizer(name: str, params, lr: float, settings: dict[str, Any]):
    if name == "adahessian":
        return AdaHessian(params, lr=lr, **{**OFFICIAL, **settings})
    if settings:
        raise ValueError(f"settings: only AdaHessian takes settings here, got {sorted(settings)} for {name!r}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)  # torch defaults: betas (0.9, 0.999), eps 1e-8, wd 0.01
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")


def train(optimizer: str, lr: float, data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
          batch_size: int = 64, eval_every: int = 10, seed: int = 0, channels: tuple[int, int] = (4, 8),
          divergence: float = 2 * math.log(10), **settings: Any) -> TrainingRun:
    """Train `digits_cnn(channels, seed)` for `steps` mini-batch steps of cross-entropy.

    Every optimizer sees the same initialisation and the same batches: the training set in the
    order of `torch.randperm(N, generator=Generator().manual_seed(seed))`, reshuffled each epoch
    from that generator (the last incomplete batch of an epoch is dropped). "adahessian" is
    `hk.optim.AdaHessian(lr=lr, seed=seed, **OFFICIAL, **settings)` (the official settings, eps
    1e-4 included, unless `settings` say otherwise) with the closure contract (the optimizer
    differentiates); "adamw" and "sgd" are torch.optim with their defaults and `loss.backward()`.
    The steps run through `hesskit.experiments.training.training_steps`: a run stops as diverged
    when a loss or parameter is not finite or the full training loss at a checkpoint reaches
    `divergence` (default 2 log 10 = 4.6, twice the loss of a uniform guess).

    The `TrainingRun` holds the full training loss ("train_loss") and test accuracy
    ("test_accuracy", a fraction) every `eval_every` steps and at 0; its `log` the time of every
    optimizer step (forward, backward, curvature and update; evaluation excluded); its `settings`
    the protocol's (batch_size, seed, steps, eval_every) and, for AdaHessian, every optimizer
    setting in effect (defaults included); its `extra` the flat parameters at each checkpoint
    ("thetas", (C, n)) and the Hessian-vector products taken ("num_hvps": AdaHessian's refreshes).
    A run that diverged has nan after it stopped.
    """
    x, y = data
    batches, checkpoints = run_plan(len(x), steps, batch_size, eval_every, seed)
    if optimizer == "adahessian":
        settings.setdefault("seed", seed)
    model = digits_cnn(channels, seed, x.dtype)
    params = list(model.parameters())
    opt = _make_optimizer(optimizer, params, lr, settings)
    recorded = {"batch_size": batch_size, "seed": seed, "steps": steps, "eval_every": eval_every}
    if isinstance(opt, AdaHessian):  # record every setting in effect, defaults included
        group = opt.param_groups[0]
        recorded.update({key: group[key] for key in ("betas", "eps", "weight_decay", "hessian_power")})
        recorded.update({key: getattr(opt, key) for key in opt.settings})
    criterion = nn.CrossEntropyLoss()
    losses = np.full(len(checkpoints), np.nan)
    accuracies = np.full(len(checkpoints), np.nan)
    thetas = np.full((len(checkpoints), sum(p.numel() for p in params)), np.nan)
    num_hvps = 0

    def step(t: int) -> Tensor:
        nonlocal num_hvps
        xb, yb = x[batches[t - 1]], y[batches[t - 1]]
        closure = make_closure("loss" if optimizer == "adahessian" else "backward", opt,
                               lambda: (criterion(model(xb), yb), None))
        loss = opt.step(closure)
        if optimizer == "adahessian":
            num_hvps += (t - 1) % opt.update_every == 0
        return loss

    def checkpoint(t: int) -> str | None:
        c = checkpoints.index(t)
        losses[c], accuracies[c] = evaluate(model, data).loss, evaluate(model, test).accuracy
        with torch.no_grad():
            thetas[c] = torch.cat([p.reshape(-1) for p in params]).double().numpy()
        return None if losses[c] < divergence else f"training loss {losses[c]} at step {t}"

    checkpoint(0)
    log = run_to_end(training_steps(step, steps, checkpoints=checkpoints, at_checkpoint=checkpoint, params=params,
                                    label=f"{LABELS.get(optimizer, optimizer)} step"))
    return TrainingRun(optimizer, float(lr), log, np.array(checkpoints),
                       {"train_loss": losses, "test_accuracy": accuracies}, settings=recorded,
                       extra={"thetas": thetas, "num_hvps": num_hvps}, name=LABELS[optimizer])


def tune(grid: Sequence[float], data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int = 300,
         batch_size: int = 64, eval_every: int = 10, seed: int = 0, channels: tuple[int, int] = (4, 8),
         optimizers: Sequence[str] = OPTIMIZERS, **settings: Any) -> Tuning:
    """Train each optimizer at every learning rate of the same `grid` (same init, batches, seed):
    `hesskit.experiments.training.tune` of `train` with this setup bound, so that `tuning.train`
    trains one more run like them and `tuning.best` picks the lowest final training loss.

    `settings` go to AdaHessian only (otherwise the official settings, `OFFICIAL`)."""
    train_fn = partial(train, data=data, test=test, steps=steps, batch_size=batch_size, eval_every=eval_every,
                       seed=seed, channels=tuple(channels))
    return training.tune(train_fn, {name: grid for name in optimizers},
                         settings={"adahessian": settings} if settings and "adahessian" in optimizers else None)


@dataclass
class StepCost:
    """Seconds per optimizer step, measured interleaved: `seconds[b, j]` is the mean step time of
    optimizer `labels[j]` over block b (every block holds a whole number of refresh periods)."""

    labels: list[str]
    update_every: list[int | None]  # None for AdamW and SGD
    seconds: np.ndarray  # (num_blocks, num_optimizers)

    def ratio(self, label: str, reference: str = "AdamW") -> float:
        """Median over blocks of the step time of `label` divided by that of `reference`."""
        i, j = self.labels.index(label), self.labels.index(reference)
        return float(np.median(self.seconds[:, i] / self.seconds[:, j]))

    def ratios(self, reference: str = "AdamW") -> np.ndarray:
        return np.array([self.ratio(label, reference) for label in self.labels])


def step_costs(data: tuple[Tensor, Tensor], update_every: Sequence[int] = (1, 2, 5, 10, 20), rounds: int = 100,
               batch_size: int = 64, seed: int = 0, channels: tuple[int, int] = (4, 8)) -> StepCost:
    """Time AdamW, SGD and AdaHessian (one per refresh period u) on the digits CNN, one step of
    each in turn on the same batch, `rounds` times: machine load then hits every optimizer alike.

    An AdaHessian refresh builds the gradient's graph (create_graph) and takes one Hessian-vector
    product (a second backward pass); the other steps cost about one AdamW step. Rounds are
    grouped into blocks of lcm(update_every) steps, so each block's mean is the amortised cost.
    """
    x, y = data
    periods = [int(u) for u in update_every]
    if not periods or min(periods) < 1:
        raise ValueError(f"update_every: expected positive integers, got {list(update_every)}")
    block = math.lcm(*periods)
    rounds = max(block, -(-rounds // block) * block)
    specs = [("AdamW", "adamw", {}), ("SGD", "sgd", {})]
    specs += [(f"AdaHessian, u = {u}", "adahessian", dict(update_every=u, seed=seed)) for u in periods]
    criterion = nn.CrossEntropyLoss()
    steps = []
    for label, name, settings in specs:
        model = digits_cnn(channels, seed, x.dtype)
        opt = _make_optimizer(name, model.parameters(), 1e-3, settings)
        kind = "loss" if name == "adahessian" else "backward"

        def step(batch, model=model, opt=opt, kind=kind):
            opt.step(make_closure(kind, opt, lambda: (criterion(model(batch[0]), batch[1]), None)))

        steps.append((label, step))
    batches = ((x[idx], y[idx]) for idx in iter_random_batches(len(x), rounds, batch_size, seed))  # drawn per round
    labels, times = interleaved_step_times(steps, batches)
    seconds = times.reshape(rounds // block, block, len(labels)).mean(axis=1)
    return StepCost(labels, [None, None, *periods], seconds)
