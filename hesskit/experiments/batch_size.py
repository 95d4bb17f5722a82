"""Notebook 05 (`05_batch_size_and_learning_rate.ipynb`): the curvature of mini-batch losses, and what
it says about learning rates.

The mini-batch Hessian H_B = (1/B) sum_{i in B} H_i is an unbiased but noisy copy of the
full-batch Hessian H. Its top eigenvalue is biased upwards: lambda_max is convex, so
E lambda_max(H_B) >= lambda_max(H), and the bias shrinks as B grows (Granziol, Zohren & Roberts,
JMLR 2022). A step of SGD on the batch loss is stable only if lr < 2 / lambda_max(H_B), so the
largest stable learning rate grows with B until it saturates at the full-batch value: the
curvature view of the linear scaling rule for SGD and the square-root rule for Adam.

Studies: lambda_max(H_B) of many mini-batches per batch size (`minibatch_top_eigenpair`,
`minibatch_sharpness`, `MinibatchSharpness`); the learning-rate scaling rules (`scaled_lr`,
`RULES`) checked by training populations of small MLPs in lockstep (`train_population`,
`OPTIMIZERS`, `scaling_check`, `ScalingCheck`). The notebook's explorer is
`hesskit.widgets.batch_size.BatchSizeExplorer`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import progress
from ..curvature.eigen import eigenvalues
from ..curvature.operators import HessianOperator
from ..models import MLP

__all__ = [
    "RULES",
    "OPTIMIZERS",
    "MinibatchSharpness",
    "ScalingCheck",
    "minibatch_top_eigenpair",
    "minibatch_sharpness",
    "scaled_lr",
    "train_population",
    "scaling_check",
]

RULES = ("none", "sqrt", "linear")
OPTIMIZERS = ("sgd", "adam")


# --------------------------------------------------------------------------- curvature
def minibatch_top_eigenpair(model: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor, seed: int = 0,
                            tol: float = 1e-3, operator: type = HessianOperator) -> tuple[float, Tensor]:
    """lambda_max and its unit eigenvector of the Hessian (or `operator`) of the mean loss on the
    batch (x, y), by Lanczos (`hk.eigenvalues`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unconverged pair is still within its residual of the truth
        result = eigenvalues(operator(model, criterion, (x, y)), k=1, which="largest", tol=tol, seed=seed)
    return float(result.values[0]), result.vectors[:, 0]


@dataclass
class MinibatchSharpness:
    """lambda_max(H_B) of `num_batches` random mini-batches for each batch size B.

    `values[s, j]` is the top eigenvalue of the j-th mini-batch of size `batch_sizes[s]`;
    `overlaps[s, j]` = |<v_B, v>|, the cosine between its top eigenvector and the full-batch one.
    """

    batch_sizes: np.ndarray  # (S,) int
    values: np.ndarray  # (S, num_batches)
    overlaps: np.ndarray  # (S, num_batches)
    full: float  # lambda_max(H) on all num_samples samples
    num_samples: int
    num_matvecs: int

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean(axis=1)

    @property
    def std(self) -> np.ndarray:
        return self.values.std(axis=1, ddof=1) if self.values.shape[1] > 1 else np.zeros(len(self.batch_sizes))

    @property
    def stderr(self) -> np.ndarray:
        return self.std / math.sqrt(self.values.shape[1])

    def excess_coefficient(self) -> float:
        """c in E lambda_max(H_B) ~ lambda_max(H) + c (1/B - 1/N), by weighted least squares.

        The spiked random-matrix model of Granziol et al. (2022) gives an outlier at
        lambda + (P/B) sigma^2 / lambda: an excess proportional to the noise variance, which is
        (1/B - 1/N) N/(N-1) for batches drawn without replacement. Batches with no spread carry
        no information and are left out.
        """
        u = 1.0 / self.batch_sizes - 1.0 / self.num_samples
        keep = (u > 1e-12) & (self.stderr > 0)
        if not keep.any():
            return 0.0
        w = 1.0 / self.stderr[keep] ** 2
        return float(np.sum(w * u[keep] * (self.mean[keep] - self.full)) / np.sum(w * u[keep] ** 2))

    def model_curve(self, batch_sizes: np.ndarray) -> np.ndarray:
        """The fitted lambda_max(H) + c (1/B - 1/N)."""
        b = np.asarray(batch_sizes, dtype=float)
        return self.full + self.excess_coefficient() * (1.0 / b - 1.0 / self.num_samples)

    def critical_batch_size(self) -> float:
        """B* = c / lambda_max(H): below it the noise term dominates lambda_max(H_B) (and the
        largest stable SGD step grows about linearly with B); above it, lambda_max(H_B) is
        within a factor 2 of the full-batch value and the stable step saturates."""
        return max(self.excess_coefficient(), 0.0) / self.full

    def max_stable_lr(self) -> np.ndarray:
        """2 / E lambda_max(H_B): the largest SGD step that does not overshoot along the
        sharpest direction of a typical mini-batch loss (a quadratic-model heuristic)."""
        return 2.0 / self.mean


def minibatch_sharpness(model: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor, batch_sizes: Sequence[int],
                        num_batches: int = 16, seed: int = 0, tol: float = 1e-3,
                        operator: type = HessianOperator) -> MinibatchSharpness:
    """Top Hessian eigenvalue of `num_batches` random mini-batches per batch size.

    Each mini-batch is drawn without replacement from (x, y) with a seeded generator; B = N
    (the whole set) is computed once and repeated. Uses Lanczos on
    `operator(model, criterion, (x_B, y_B))`: the Hessian by default, `hk.GGNOperator` works too
    (Granziol, Zohren & Roberts, "Learning rates as a function of batch size: a random matrix theory
    approach to neural network training", JMLR 2022).
    """
    n = len(x)
    sizes = np.array(sorted(set(int(b) for b in batch_sizes)))
    if len(sizes) == 0 or sizes[0] < 1 or sizes[-1] > n:
        raise ValueError(f"batch_sizes: expected sizes in 1..{n}, got {list(batch_sizes)}")
    if num_batches < 1:
        raise ValueError(f"num_batches: expected at least 1, got {num_batches}")
    full, v_full = minibatch_top_eigenpair(model, criterion, x, y, seed=seed, tol=tol, operator=operator)
    gen = torch.Generator().manual_seed(seed)
    values = np.empty((len(sizes), num_batches))
    overlaps = np.empty_like(values)
    matvecs = 0
    for s, b in enumerate(sizes):
        for j in range(num_batches):
            progress.report(s * num_batches + j + 1, len(sizes) * num_batches, "mini-batch Hessians")  # while an explorer renders
            if b == n:
                values[s, j], overlaps[s, j] = full, 1.0
                continue
            idx = torch.randperm(n, generator=gen)[:b]
            op = operator(model, criterion, (x[idx], y[idx]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = eigenvalues(op, k=1, which="largest", tol=tol, seed=seed + 1 + j)
            values[s, j] = float(r.values[0])
            overlaps[s, j] = abs(float(r.vectors[:, 0] @ v_full))
            matvecs += r.num_matvecs
    return MinibatchSharpness(sizes, values, overlaps, full, n, matvecs)


# --------------------------------------------------------------------------- scaling rules
def scaled_lr(base_lr: float, base_batch: int, batch_size: int, rule: str) -> float:
    """The learning rate for `batch_size` from `base_lr` tuned at `base_batch`.

    "linear": lr ~ B (SGD: Krizhevsky 2014; Goyal et al. 2017); "sqrt": lr ~ sqrt(B) (Adam:
    Granziol et al. 2022; Malladi et al. 2022); "none": keep base_lr.
    """
    k = batch_size / base_batch
    factors = {"none": 1.0, "sqrt": math.sqrt(k), "linear": k}
    if rule not in factors:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    return base_lr * factors[rule]


def _population_params(x: Tensor, seeds: Sequence[int], hidden: int, num_classes: int,
                       init: nn.Module | None) -> list[Tensor]:
    """The stacked weights of K one-hidden-layer MLPs, model k made after `torch.manual_seed(seeds[k])`
    (or a copy of `init`): W1^T (k, d, h), b1 (k, 1, h), W2^T (k, h, C), b2 (k, 1, C), requiring grad."""
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(MLP(x.shape[1], (hidden,), num_classes).to(x.dtype) if init is None else init)
    params = [torch.stack([m[i].weight.detach().T for m in models]) for i in (1, 3)]
    biases = [torch.stack([m[i].bias.detach()[None] for m in models]) for i in (1, 3)]
    params = [params[0], biases[0], params[1], biases[1]]
    for p in params:
        p.requires_grad_()
    return params


def _population_losses(params: list[Tensor], xb: Tensor, yb: Tensor) -> Tensor:
    """The mean cross-entropy of each of the K stacked models on its own batch: xb (k, b, d), yb (k, b)."""
    hid = torch.tanh(torch.baddbmm(params[1], xb, params[0]))
    logits = torch.baddbmm(params[3], hid, params[2])
    return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(len(xb), -1).mean(1)


@torch.no_grad()
def _population_step(optimizer: str, params: list[Tensor], grads: tuple[Tensor, ...],
                     moments: list[tuple[Tensor, Tensor]], lr: Tensor, step: int, betas: tuple[float, float],
                     eps: float) -> None:
    """One SGD or Adam step (as torch.optim.Adam, `step` counted from 1) of every stacked model."""
    for p, g, (m, v) in zip(params, grads, moments):
        if optimizer == "sgd":
            p.sub_(lr * g)
        else:
            m.lerp_(g, 1 - betas[0])
            v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            denom = (v / (1 - betas[1] ** step)).sqrt_().add_(eps)
            p.sub_(lr / (1 - betas[0] ** step) * m / denom)


def train_population(optimizer: str, lrs: Sequence[float], seeds: Sequence[int], x: Tensor, y: Tensor,
                     batch_size: int, epochs: int, hidden: int = 16, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, init: nn.Module | None = None) -> np.ndarray:
    """Train K = len(lrs) one-hidden-layer tanh MLPs in lockstep; return their final full-batch losses.

    Model k starts as `hk.models.MLP(d, (hidden,), C)` after `torch.manual_seed(seeds[k])` (or as
    a copy of `init`, an MLP of that shape, when given), sees the training set in the order of
    `torch.randperm(N, generator=torch.Generator().manual_seed(seeds[k]))` each epoch (the last
    incomplete batch is dropped), and takes plain SGD steps or Adam steps (Kingma & Ba 2015, as
    torch.optim.Adam) with learning rate lrs[k]. The K models are stored as
    stacked weights and run as batched matrix products, so K runs cost about one on a CPU.
    A run that blew up returns inf.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if len(lrs) != len(seeds) or not lrs:
        raise ValueError(f"lrs, seeds: expected non-empty lists of one length, got {len(lrs)} and {len(seeds)}")
    n, k = len(x), len(lrs)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: expected 1..{n}, got {batch_size}")
    x = x.reshape(n, -1)
    params = _population_params(x, seeds, hidden, int(y.max()) + 1, init)
    lr = torch.tensor(list(lrs), dtype=x.dtype).view(k, 1, 1)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    step = 0
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[:, start : start + batch_size]
            grads = torch.autograd.grad(_population_losses(params, x[idx], y[idx]).sum(), params)
            step += 1
            _population_step(optimizer, params, grads, moments, lr, step, betas, eps)
    with torch.no_grad():
        final = _population_losses(params, x.expand(k, -1, -1), y.expand(k, -1)).numpy()
    return np.where(np.isfinite(final), final, np.inf)


@dataclass
class ScalingCheck:
    """Final training losses `losses[optimizer][rule]` of shape (len(batch_sizes), len(seeds)).

    A run counts as diverged when it ends at or above `divergence_loss` = 2 log(number of classes),
    twice the loss of a uniform guess (where every run starts), or at inf: a run that merely
    trained slowly ends below log(C), one that blew up far above it.
    """

    batch_sizes: np.ndarray
    base_batch: int
    base_lrs: dict[str, float]
    epochs: int
    seeds: list[int]
    losses: dict[str, dict[str, np.ndarray]]
    divergence_loss: float

    def lr(self, optimizer: str, rule: str) -> np.ndarray:
        return np.array([scaled_lr(self.base_lrs[optimizer], self.base_batch, b, rule) for b in self.batch_sizes])

    def diverged(self, optimizer: str, rule: str) -> np.ndarray:
        """(len(batch_sizes), len(seeds)) booleans: which runs diverged."""
        return ~(self.losses[optimizer][rule] < self.divergence_loss)

    def summary(self, optimizer: str, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per batch size: mean and std of the final loss over the runs that did not diverge
        (nan where all did), and the fraction of runs that diverged."""
        losses, bad = self.losses[optimizer][rule], self.diverged(optimizer, rule)
        kept = np.where(bad, np.nan, losses)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-nan rows
            mean, std = np.nanmean(kept, axis=1), np.nanstd(kept, axis=1)
        return mean, std, bad.mean(axis=1)


def scaling_check(x: Tensor, y: Tensor, batch_sizes: Sequence[int], base_batch: int, base_lrs: dict[str, float],
                  epochs: int, seeds: Sequence[int] = (0, 1, 2), rules: Sequence[str] = RULES,
                  hidden: int = 16) -> ScalingCheck:
    """Train each optimizer of `base_lrs` ("sgd", "adam") at every batch size for the same number of
    epochs, with the learning rate `scaled_lr(base_lr, base_batch, B, rule)` of each rule."""
    seeds = list(seeds)
    losses: dict[str, dict[str, np.ndarray]] = {}
    units = len(base_lrs) * len(batch_sizes)  # progress: one population (all rules and seeds) per unit
    for k, (opt, base_lr) in enumerate(base_lrs.items()):
        table = np.empty((len(batch_sizes), len(rules), len(seeds)))
        for i, b in enumerate(batch_sizes):
            lrs = [scaled_lr(base_lr, base_batch, b, rule) for rule in rules for _ in seeds]
            out = train_population(opt, lrs, seeds * len(rules), x, y, b, epochs, hidden)
            table[i] = out.reshape(len(rules), len(seeds))
            progress.report(k * len(batch_sizes) + i + 1, units, f"scaling check ({opt}, B = {b})")
        losses[opt] = {rule: table[:, r] for r, rule in enumerate(rules)}
    threshold = 2 * math.log(int(y.max()) + 1)
    return ScalingCheck(np.array(batch_sizes), base_batch, dict(base_lrs), epochs, seeds, losses, threshold)
