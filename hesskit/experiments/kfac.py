"""Notebook 08 (`08_kfac_and_mkor.ipynb`): K-FAC and MKOR, Kronecker-factored natural-gradient steps.

K-FAC (Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature", ICML 2015) approximates each layer's Fisher block by a Kronecker product of two
small matrices, F ~ A (x) G with A = E[a a^T] (layer inputs) and G = E[g g^T] (output
gradients), and preconditions the layer's gradient matrix D = [dW | db] by G^-1 D A^-1 (damped).
MKOR (Mozaffari, Li, Zhang & Mehri Dehnavi, NeurIPS 2023) keeps the inverses A^-1, G^-1 directly
and updates them with rank-1 Sherman-Morrison steps, O(d^2) instead of K-FAC's O(d^3).

This module holds what the notebook computes:

* `fisher_block` / `true_fisher_factors`: a layer's exact Fisher block (empirical or true)
  next to its Kronecker approximation, on a small float64 MLP;
* `train` / `train_together` / `tune` (a learning-rate grid: `training.tune` with this setup
  bound): one training protocol for K-FAC, MKOR, SGD with momentum and AdamW on the digits
  (same initialisation, same batches, same seeds), recording (in a
  `hesskit.experiments.training.TrainingRun`) the loss on the whole training set, the test
  accuracy, and the wall-clock and CPU time of every step, tagged by what the step did (a plain
  step, a factor refresh, an inverse refresh: `step_kinds`); the steps run in
  `hesskit.experiments.training.training_steps`, and runs trained together are interleaved so
  that their clocks are comparable;
* `preconditioning_table`: which layers of a model K-FAC preconditions and which fall back to SGD.

The notebook's explorer is `hesskit.widgets.kfac.KFACExplorer`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import progress
from ..curvature.kfac import KroneckerOperator, find_layers, kfac_factors
from ..curvature.operators import EmpiricalFisherOperator, GGNOperator
from ..optim import KFAC, MKOR, make_closure
from .tasks import Task
from . import training
from .training import TrainingRun, Tuning, batch_order, training_steps

__all__ = [
    "FisherBlock",
    "KINDS",
    "LABELS",
    "OPTIMIZERS",
    "default_inverse_every",
    "fisher_block",
    "make_optimizer",
    "preconditioning_table",
    "step_kinds",
    "train",
    "train_together",
    "true_fisher_factors",
    "tune",
]

OPTIMIZERS = ("kfac", "mkor", "sgd", "adamw")
LABELS = {"kfac": "K-FAC", "mkor": "MKOR", "sgd": "SGD-momentum", "adamw": "AdamW"}
KINDS = ("plain", "factors", "inverse")


# --------------------------------------------------------------------------- the exact block and its approximation
def true_fisher_factors(model: nn.Module, x: Tensor) -> dict[str, KroneckerOperator]:
    """K-FAC factors of the *true* Fisher of a softmax classifier, with the expectation over the
    labels computed exactly instead of sampled (Martens & Grosse 2015, section 5).

    `hk.kfac_factors(..., fisher="mc")` draws one label y ~ softmax(f(x_n)) per sample; here
    every sample is repeated once per class c and weighted by p_n(c), so
    G = (1/N) sum_n sum_c p_n(c) g_nc g_nc^T exactly, g_nc the output gradient for label c:
    the expectation of what fisher="mc" estimates. (The weights enter the loss as
    sqrt(C p_n(c)) because G is quadratic in the gradient.)
    """
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=-1)
    n, classes = probs.shape
    inputs = x.repeat_interleave(classes, dim=0)
    labels = torch.arange(classes).repeat(n)
    targets = torch.stack([labels.to(probs.dtype), probs.reshape(-1)], dim=1)

    def weighted_cross_entropy(outputs: Tensor, t: Tensor) -> Tensor:
        per_row = F.cross_entropy(outputs, t[:, 0].long(), reduction="none")
        return ((classes * t[:, 1]).sqrt() * per_row).mean()

    return kfac_factors(model, weighted_cross_entropy, (inputs, targets))


@dataclass
class FisherBlock:
    """One layer's exact Fisher block next to its Kronecker approximation (both in hesskit's
    parameter order [weight row by row, bias])."""

    layer: str
    fisher: str  # "empirical" or "true"
    num_samples: int
    exact: Tensor
    kronecker: Tensor
    factor: KroneckerOperator

    @property
    def relative_error(self) -> float:
        """||F - A (x) G||_F / ||F||_F."""
        return float((self.exact - self.kronecker).norm() / self.exact.norm())


def fisher_block(model: nn.Module, x: Tensor, y: Tensor, layer: str, fisher: str = "empirical") -> FisherBlock:
    """The exact Fisher block of `layer` (an nn.Linear / nn.Conv2d name of `model`) on (x, y), and
    its K-FAC approximation A (x) G, for a softmax classifier with the mean cross-entropy.

    fisher="empirical": `hk.EmpiricalFisherOperator` restricted to the layer, (1/N) sum_n g_n g_n^T
    with the training labels, against `hk.kfac_factors(...)` on the same labels.
    fisher="true": `hk.GGNOperator` restricted to the layer (for softmax cross-entropy the
    generalised Gauss-Newton matrix *is* the true Fisher), against `true_fisher_factors`.
    """
    if fisher not in ("empirical", "true"):
        raise ValueError(f"fisher: expected 'empirical' or 'true', got {fisher!r}")
    names = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] == layer]
    if not names:
        raise ValueError(f"layer: {layer!r} has no parameters in the model")
    criterion = nn.CrossEntropyLoss()
    operator = EmpiricalFisherOperator if fisher == "empirical" else GGNOperator
    exact = operator(model, criterion, (x, y), params=names).dense().detach()
    factors = kfac_factors(model, criterion, (x, y)) if fisher == "empirical" else true_fisher_factors(model, x)
    return FisherBlock(layer, fisher, len(x), exact, factors[layer].dense(), factors[layer])


# --------------------------------------------------------------------------- the task
# The task is a `hesskit.experiments.tasks.digits_task` (the notebook's: `digits_task("mlp", hidden=(64,))`).
# Evaluations run EVAL_CHUNK images at a time: large temporary tensors would be returned to the operating
# system after use, and the next training step would pay to map fresh memory (a timing spike).
EVAL_CHUNK = 128


def _scores(task: Task, model: nn.Module) -> tuple[float, float, float]:
    """(mean loss on all training images, test loss, test accuracy as a fraction) by `Task.evaluate`
    (a non-finite loss reads nan), EVAL_CHUNK images at a time."""
    train = task.evaluate(model, task.train, chunk=EVAL_CHUNK)
    test = task.evaluate(model, task.test, chunk=EVAL_CHUNK)
    return train.loss, test.loss, test.accuracy


# --------------------------------------------------------------------------- optimizers and the protocol
def default_inverse_every(name: str) -> int:
    """The optimizers' own default refresh intervals: K-FAC 100 (eigendecompositions; alecwangcq's
    TInv), MKOR 10 (rank-1 inverse updates; the public code's inv_freq)."""
    return 10 if name == "mkor" else 100


def make_optimizer(name: str, model: nn.Module, lr: float, damping: float = 1e-3, factor_every: int = 10,
                   inverse_every: int | None = None, fisher: str = "empirical", kl_clip: float | None = 1e-3,
                   seed: int = 0) -> torch.optim.Optimizer:
    """One of `OPTIMIZERS`, all with momentum 0.9 (AdamW: betas (0.9, 0.999)) and no weight decay.

    "kfac": `hk.optim.KFAC` (factors every `factor_every` steps, eigendecompositions every
    `inverse_every`, eigen-form `damping`, KL clip `kl_clip`); "mkor": `hk.optim.MKOR` (rank-1
    Sherman-Morrison inverse updates every `inverse_every` steps; it has no damping and no
    separate factor schedule); "sgd": `torch.optim.SGD`; "adamw": `torch.optim.AdamW`.
    `inverse_every=None` takes `default_inverse_every(name)`.
    """
    if inverse_every is None:
        inverse_every = default_inverse_every(name)
    if name == "kfac":
        return KFAC(model, lr=lr, momentum=0.9, damping=damping, kl_clip=kl_clip, factor_every=factor_every,
                    inverse_every=inverse_every, fisher=fisher, seed=seed)
    if name == "mkor":
        return MKOR(model, lr=lr, momentum=0.9, inverse_every=inverse_every, fisher=fisher, seed=seed)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")


def step_kinds(name: str, steps: int, factor_every: int = 10, inverse_every: int | None = None) -> np.ndarray:
    """What each step t = 0..steps-1 does beyond a gradient and an update, by the optimizers' schedules:
    K-FAC: "inverse" (eigendecompositions of the factors, t % inverse_every == 0, with a
    factor update too when t % factor_every == 0), "factors" (hooks and factor EMA only,
    t % factor_every == 0), else "plain"; MKOR: "inverse" (rank-1
    inverse updates; t % inverse_every == 0), else "plain"; SGD, AdamW: "plain"."""
    inverse_every = default_inverse_every(name) if inverse_every is None else inverse_every
    t = np.arange(steps)
    kinds = np.full(steps, "plain", dtype=object)
    if name == "kfac":
        kinds[t % factor_every == 0] = "factors"
        kinds[t % inverse_every == 0] = "inverse"  # step 0 included: the first factors are decomposed at once
    elif name == "mkor":
        kinds[t % inverse_every == 0] = "inverse"
    return kinds


def run_settings(name: str, steps: int = 300, batch_size: int = 64, damping: float = 1e-3, factor_every: int = 10,
                 inverse_every: int | None = None, fisher: str = "empirical", kl_clip: float | None = 1e-3,
                 seed: int = 0, eval_every: int = 10) -> dict:
    """The `settings` of a `TrainingRun` of `name` (`train`'s arguments besides name and lr that
    the run depends on): the protocol's (batch_size, seed, steps, eval_every), and K-FAC's damping,
    factor_every, inverse_every, fisher and kl_clip or MKOR's inverse_every and fisher.
    `inverse_every=None` is the optimizer's default (`default_inverse_every`)."""
    settings = {"batch_size": batch_size, "seed": seed, "steps": steps, "eval_every": eval_every}
    inverse_every = default_inverse_every(name) if inverse_every is None else inverse_every
    if name == "kfac":
        settings.update(damping=damping, factor_every=factor_every, inverse_every=inverse_every, fisher=fisher,
                        kl_clip=kl_clip)
    elif name == "mkor":
        settings.update(inverse_every=inverse_every, fisher=fisher)
    return settings


def _training(task: Task, name: str, lr: float, steps: int = 300, batch_size: int = 64, damping: float = 1e-3,
              factor_every: int = 10, inverse_every: int | None = None, fisher: str = "empirical",
              kl_clip: float | None = 1e-3, seed: int = 0, eval_every: int = 10) -> Iterator[int]:
    """One training run as a generator, so that `train_together` can interleave runs and report
    progress: it yields its number of steps once set up (after the first evaluation), then runs
    `training_steps`, which pauses after each evaluation and yields the number of steps taken so
    far; it returns the `TrainingRun` (see `train`)."""
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError(f"steps, batch_size, eval_every: expected positive integers, got {steps}, {batch_size}, "
                         f"{eval_every}")
    inverse_every = default_inverse_every(name) if inverse_every is None else inverse_every
    model = task.model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback-layer warning (none for these models)
        opt = make_optimizer(name, model, lr, damping=damping, factor_every=factor_every,
                             inverse_every=inverse_every, fisher=fisher, kl_clip=kl_clip, seed=seed)
    ours = isinstance(opt, (KFAC, MKOR))
    kind = "backward" if not ours else "loss_outputs" if fisher == "mc" else "loss"
    batches = batch_order(len(task.train[0]), steps, batch_size, seed)
    # evaluations after steps e/2, 3e/2, ... (and at 0 and the end), half an interval away from the
    # refresh steps 0, 10, 20, ... of the default schedules: evaluating the whole data set pushes the
    # training data out of the CPU caches, which makes the next step slower.
    eval_steps = np.unique(np.r_[0, np.arange(eval_every // 2, steps + 1, eval_every), steps])
    train_loss, test_loss, test_acc = (np.full(len(eval_steps), np.nan) for _ in range(3))
    train_loss[0], test_loss[0], test_acc[0] = _scores(task, model)

    def step(t: int) -> Tensor:
        xb, yb = task.train[0][batches[t - 1]], task.train[1][batches[t - 1]]

        def compute():
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits

        return opt.step(make_closure(kind, opt, compute))

    def at_checkpoint(t: int) -> str | None:
        j = int(np.searchsorted(eval_steps, t))
        train_loss[j], test_loss[j], test_acc[j] = _scores(task, model)
        return None if math.isfinite(train_loss[j]) else f"training-set loss {train_loss[j]} at step {t}"

    yield steps
    log = yield from training_steps(step, steps, checkpoints=eval_steps[1:].tolist(), at_checkpoint=at_checkpoint,
                                    label=None)  # train_together reports the steps of all runs
    settings = run_settings(name, steps=steps, batch_size=batch_size, damping=damping, factor_every=factor_every,
                            inverse_every=inverse_every, fisher=fisher, kl_clip=kl_clip, seed=seed,
                            eval_every=eval_every)
    evals = {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_acc}
    per_step = {"kinds": step_kinds(name, steps, factor_every, inverse_every)}
    return TrainingRun(name, lr, log, eval_steps, evals, settings, per_step, name=LABELS[name])


def train_together(task: Task, configs: Sequence[dict], **common) -> list[TrainingRun]:
    """Several training runs (each a dict of `train`'s arguments: name, lr, ..., over `common`),
    interleaved: each run in turn trains until its next evaluation (about `eval_every` steps),
    then hands over to the next. A slow stretch of a shared machine then slows all runs alike,
    so their wall-clock times stay comparable. The results equal separate `train` calls'."""
    settings = [{**common, **config} for config in configs]
    runs = [_training(task, **s) for s in settings]
    results: list[TrainingRun | None] = [None] * len(runs)
    budgets = [next(run) for run in runs]  # each run sets up, evaluates its start and says how many steps it takes
    # progress, shown while an explorer renders: steps taken by all runs together
    taken = [0] * len(runs)
    what = "training " + ", ".join(dict.fromkeys(LABELS.get(s["name"], s["name"]) for s in settings)) + ": step"
    if runs:
        progress.report(0, sum(budgets), what)
    active = list(range(len(runs)))
    while active:
        for i in list(active):
            try:
                taken[i] = next(runs[i])
            except StopIteration as stop:
                results[i] = stop.value
                taken[i] = budgets[i]  # done (a diverged run stops early)
                active.remove(i)
            progress.report(sum(taken), sum(budgets), what)
    return results  # type: ignore[return-value]


def train(task: Task, name: str, lr: float, steps: int = 300, batch_size: int = 64, damping: float = 1e-3,
          factor_every: int = 10, inverse_every: int | None = None, fisher: str = "empirical",
          kl_clip: float | None = 1e-3, seed: int = 0, eval_every: int = 10) -> TrainingRun:
    """Train a fresh `task.model(seed)` with `make_optimizer(name, ...)` on the batches
    `batch_order(..., seed)`: every optimizer starts from the same weights and sees the same data
    in the same order; K-FAC's and MKOR's sampled labels (fisher="mc") are seeded by `seed`.
    `inverse_every=None` is the optimizer's default (`default_inverse_every`).

    Evaluations (the loss on the whole training set, the test loss and accuracy) happen at step
    0, after steps eval_every/2, 3 eval_every/2, ..., and at the end; they are not timed.
    Returns a `TrainingRun`: its `log` holds each step's mini-batch loss (before the step), its
    wall-clock time and its CPU time (what the step costs, without the waits a busy, shared
    machine adds to the wall clock; `run.step_time(..., clock="cpu")`); `evals` "train_loss",
    "test_loss" and "test_accuracy" (a fraction) at `eval_steps`; `per_step["kinds"]` what each
    step did (`step_kinds`); `settings` those of `run_settings`. Its `final_loss` (the
    training-set loss at the end) is what the lr grid minimises. The steps run in
    `hesskit.experiments.training.training_steps`.

    The closure follows each optimizer's contract: hesskit's optimizers differentiate the loss
    themselves (and with fisher="mc" take (loss, logits)); torch's need `loss.backward()`. A
    non-finite loss stops the run (`diverged`; what is left stays nan).
    """
    return train_together(task, [dict(name=name, lr=lr)], steps=steps, batch_size=batch_size, damping=damping,
                          factor_every=factor_every, inverse_every=inverse_every, fisher=fisher, kl_clip=kl_clip,
                          seed=seed, eval_every=eval_every)[0]


def tune(task: Task, names: Sequence[str], lrs: Sequence[float], steps: int = 300, **kwargs) -> Tuning:
    """`train` for every optimizer and every learning rate of one grid (same seed, data, init),
    all runs interleaved by `train_together` so that their wall-clock times are comparable:
    `hesskit.experiments.training.tune` of `train` with this setup bound (`kwargs`: train's
    settings; `tuning.train` trains one more run, alone). `tuning.best(name)` is the run with the
    lowest final training loss, `tuning.runs[name]` the runs in increasing lr."""
    def train_many(configs: list[tuple[str, float]]) -> list[TrainingRun]:
        return train_together(task, [dict(name=name, lr=lr) for name, lr in configs], steps=steps, **kwargs)

    train_fn = partial(train, task, steps=steps, **kwargs)
    return training.tune(train_fn, {name: lrs for name in names}, train_many=train_many)


# --------------------------------------------------------------------------- which layers are preconditioned
def preconditioning_table(model: nn.Module) -> list[dict]:
    """One row per module that owns trainable parameters: its name, type, number of parameters
    and whether K-FAC / MKOR precondition it ("K-FAC") or it takes the fallback SGD step (with
    the reason), as `hk.optim.KFAC` decides (nn.Linear, transformers' Conv1D, nn.Conv2d with groups=1 and nn.Embedding)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    layers, fallback = find_layers(model, trained)
    owners: dict[str, int] = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            owner = pname.rpartition(".")[0] or pname
            owners[owner] = owners.get(owner, 0) + p.numel()
    preconditioned = {layer.name for layer in layers}
    rows = []
    for owner, count in owners.items():
        module = model.get_submodule(owner) if owner in dict(model.named_modules()) else None
        kind = type(module).__name__ if module is not None else "nn.Parameter"
        how = "K-FAC" if owner in preconditioned else f"fallback SGD ({fallback.get(owner, kind)})"
        rows.append({"module": owner, "type": kind, "params": count, "step": how})
    return rows
