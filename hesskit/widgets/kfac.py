"""Notebook 08: K-FAC and MKOR, Kronecker-factored natural-gradient steps.

K-FAC (Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature", ICML 2015) approximates each layer's Fisher block by a Kronecker product of two
small matrices, F ~ A (x) G with A = E[a a^T] (layer inputs) and G = E[g g^T] (output
gradients), and preconditions the layer's gradient matrix D = [dW | db] by G^-1 D A^-1 (damped).
MKOR (Mozaffari, Li, Zhang & Mehri Dehnavi, NeurIPS 2023) keeps the inverses A^-1, G^-1 directly
and updates them with rank-1 Sherman-Morrison steps, O(d^2) instead of K-FAC's O(d^3).

This module holds what the notebook computes:

* `fisher_block` / `true_fisher_factors`: a layer's exact Fisher block (empirical or true)
  next to its Kronecker approximation, on a small float64 MLP;
* `train` / `train_together` / `lr_sweep`: one training protocol for K-FAC, MKOR, SGD with
  momentum and AdamW on the digits (same initialisation, same batches, same seeds), recording
  the loss on the whole training set, the test accuracy, and the wall-clock and CPU time of
  every step, tagged by what the step did (a plain step, a factor refresh, an inverse refresh);
  runs trained together are interleaved so that their clocks are comparable;
* `preconditioning_table`: which layers of a model K-FAC preconditions and which fall back to SGD;
* `KFACExplorer`: the widget.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import digits
from ..curvature.kfac import KroneckerOperator, find_layers, kfac_factors
from ..models import MLP, SmallCNN
from ..curvature.operators import EmpiricalFisherOperator, GGNOperator
from ..optim import KFAC, MKOR
from .explorer import Explorer
from ..experiments.training import batch_order, best_run
from ..optim.closures import make_closure
from .. import progress

__all__ = [
    "KFACExplorer",
    "DigitsTask",
    "TrainingRun",
    "FisherBlock",
    "digits_task",
    "batch_order",
    "make_optimizer",
    "default_inverse_every",
    "step_kinds",
    "train",
    "train_together",
    "lr_sweep",
    "best_run",
    "true_fisher_factors",
    "fisher_block",
    "preconditioning_table",
]

OPTIMIZERS = ("kfac", "mkor", "sgd", "adamw")
LABELS = {"kfac": "K-FAC", "mkor": "MKOR", "sgd": "SGD-momentum", "adamw": "AdamW"}
COLORS = {"kfac": "C0", "mkor": "C2", "sgd": "C7", "adamw": "C1"}
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
@dataclass
class DigitsTask:
    """The 8x8 digits (1,438 training, 359 test images) and the network trained on them."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    architecture: str = "mlp"  # "mlp" (64-hidden-10, tanh) or "cnn" (hk.models.SmallCNN)
    hidden: tuple[int, ...] = (64,)
    channels: tuple[int, int] = (4, 8)

    def model(self, seed: int = 0) -> nn.Module:
        """A fresh network; the same seed gives the same initial weights for every optimizer."""
        torch.manual_seed(seed)
        if self.architecture == "cnn":
            return SmallCNN(channels=self.channels)
        return MLP(64, self.hidden, 10, activation="tanh")

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model().parameters())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, chunk: int = 128) -> tuple[float, float, float]:
        """(mean training loss on all training images, test loss, test accuracy).

        In chunks of `chunk` images: large temporary tensors would be returned to the operating
        system after use, and the next training step would pay to map fresh memory (a timing spike)."""

        def logits_of(x: Tensor) -> Tensor:
            return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])

        train_loss = F.cross_entropy(logits_of(self.x), self.y).item()
        logits = logits_of(self.x_test)
        accuracy = (logits.argmax(1) == self.y_test).double().mean().item()
        return train_loss, F.cross_entropy(logits, self.y_test).item(), accuracy


def digits_task(architecture: str = "mlp", hidden: tuple[int, ...] = (64,), channels: tuple[int, int] = (4, 8),
                seed: int = 0) -> DigitsTask:
    """`hk.data.digits` (20% held out, seeded split) for an MLP (flattened images) or a SmallCNN."""
    if architecture not in ("mlp", "cnn"):
        raise ValueError(f"architecture: expected 'mlp' or 'cnn', got {architecture!r}")
    (x, y), (x_test, y_test) = digits(flatten=architecture == "mlp", seed=seed)
    return DigitsTask(x, y, x_test, y_test, architecture, tuple(hidden), tuple(channels))


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


@dataclass
class TrainingRun:
    """One training run of `steps` steps.

    Per step t = 1..steps: `batch_loss[t-1]` (the mini-batch loss before the step),
    `step_seconds[t-1]` (wall-clock time of `opt.step`, forward and backward included),
    `step_cpu_seconds[t-1]` (the CPU time the process spent in it: what the step costs, without
    the waits a busy, shared machine adds to the wall clock) and `kinds[t-1]` (see `step_kinds`).
    At `eval_steps[j]` (0 = the initial network): the mean loss on the whole training set
    `train_loss[j]`, the test loss and the test accuracy.
    """

    name: str
    lr: float
    settings: dict
    batch_loss: np.ndarray
    step_seconds: np.ndarray
    step_cpu_seconds: np.ndarray
    kinds: np.ndarray
    eval_steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    diverged: bool = False

    @property
    def label(self) -> str:
        return f"{LABELS[self.name]}, lr {self.lr:.2g}"

    @property
    def eval_seconds(self) -> np.ndarray:
        """Cumulative training wall-clock time (evaluation excluded) at each evaluation."""
        return self._cumulative(self.step_seconds)

    @property
    def eval_cpu_seconds(self) -> np.ndarray:
        """Cumulative training CPU time (evaluation excluded) at each evaluation."""
        return self._cumulative(self.step_cpu_seconds)

    def _cumulative(self, times: np.ndarray) -> np.ndarray:
        cumulative = np.concatenate([[0.0], np.cumsum(np.nan_to_num(times))])
        return cumulative[np.minimum(self.eval_steps, len(times))]

    @property
    def final_loss(self) -> float:
        """The training-set loss at the end (inf if the run diverged): what the lr grid minimises."""
        last = self.train_loss[-1]
        return float(last) if not self.diverged and math.isfinite(last) else math.inf

    @property
    def final_accuracy(self) -> float:
        return float(self.test_accuracy[-1]) if not self.diverged else math.nan

    def steps_to(self, target: float) -> float:
        """The first evaluated step with training-set loss <= target (nan if never reached)."""
        hit = np.flatnonzero(self.train_loss <= target)
        return float(self.eval_steps[hit[0]]) if len(hit) else math.nan

    def seconds_to(self, target: float, clock: str = "wall") -> float:
        """Training time (clock "wall" or "cpu") until the training-set loss first reached `target`
        (nan if never)."""
        hit = np.flatnonzero(self.train_loss <= target)
        times = self.eval_seconds if clock == "wall" else self.eval_cpu_seconds
        return float(times[hit[0]]) if len(hit) else math.nan

    def step_time(self, kind: str | None = None, statistic: str = "median", clock: str = "cpu") -> float:
        """A statistic ("median", "mean", "max") of the steps' times in seconds, of one step kind
        (see `step_kinds`) or of all steps; clock "cpu" (CPU time) or "wall" (wall-clock time)."""
        if clock not in ("cpu", "wall") or statistic not in ("median", "mean", "max"):
            raise ValueError(f"clock, statistic: expected 'cpu'/'wall' and 'median'/'mean'/'max', got {clock!r}, "
                             f"{statistic!r}")
        times = self.step_cpu_seconds if clock == "cpu" else self.step_seconds
        chosen = np.isfinite(times) if kind is None else np.isfinite(times) & (self.kinds == kind)
        if not chosen.any():
            return math.nan
        return float({"median": np.median, "mean": np.mean, "max": np.max}[statistic](times[chosen]))


def _training(task: DigitsTask, name: str, lr: float, steps: int = 300, batch_size: int = 64, damping: float = 1e-3,
              factor_every: int = 10, inverse_every: int | None = None, fisher: str = "empirical",
              kl_clip: float | None = 1e-3, seed: int = 0, eval_every: int = 10) -> Iterator[int]:
    """One training run as a generator, so that `train_together` can interleave runs and report
    progress: it yields its number of steps once set up (after the first evaluation), then pauses
    after each evaluation and yields the number of steps taken so far; it returns the `TrainingRun`."""
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
    wants_logits = ours and fisher == "mc"
    batches = batch_order(len(task.x), steps, batch_size, seed)
    batch_loss = np.full(steps, np.nan)
    seconds = np.full(steps, np.nan)
    cpu_seconds = np.full(steps, np.nan)
    # evaluations after steps e/2, 3e/2, ... (and at 0 and the end), half an interval away from the
    # refresh steps 0, 10, 20, ... of the default schedules: evaluating the whole data set pushes the
    # training data out of the CPU caches, which makes the next step slower.
    eval_steps = np.unique(np.r_[0, np.arange(eval_every // 2, steps + 1, eval_every), steps])
    train_loss, test_loss, test_acc = (np.full(len(eval_steps), np.nan) for _ in range(3))
    train_loss[0], test_loss[0], test_acc[0] = task.evaluate(model)
    diverged = False
    yield steps
    for t in range(1, steps + 1):
        xb, yb = task.x[batches[t - 1]], task.y[batches[t - 1]]

        def compute():
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits

        closure = make_closure("backward" if not ours else "loss_outputs" if wants_logits else "loss", opt, compute)

        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            loss = float(opt.step(closure).detach())
        except FloatingPointError:
            loss = math.nan
        seconds[t - 1] = time.perf_counter() - start
        cpu_seconds[t - 1] = time.process_time() - cpu_start
        batch_loss[t - 1] = loss
        if not math.isfinite(loss):
            diverged = True
            break
        if t in eval_steps:
            j = int(np.searchsorted(eval_steps, t))
            train_loss[j], test_loss[j], test_acc[j] = task.evaluate(model)
            if not math.isfinite(train_loss[j]):
                diverged = True
                break
            yield t
    settings = {"batch_size": batch_size, "seed": seed, "steps": steps, "eval_every": eval_every}
    if name == "kfac":
        settings.update(damping=damping, factor_every=factor_every, inverse_every=inverse_every, fisher=fisher,
                        kl_clip=kl_clip)
    elif name == "mkor":
        settings.update(inverse_every=inverse_every, fisher=fisher)
    kinds = step_kinds(name, steps, factor_every, inverse_every)
    return TrainingRun(name, lr, settings, batch_loss, seconds, cpu_seconds, kinds, eval_steps, train_loss, test_loss,
                       test_acc, diverged)


def train_together(task: DigitsTask, configs: Sequence[dict], **common) -> list[TrainingRun]:
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


def train(task: DigitsTask, name: str, lr: float, steps: int = 300, batch_size: int = 64, damping: float = 1e-3,
          factor_every: int = 10, inverse_every: int | None = None, fisher: str = "empirical",
          kl_clip: float | None = 1e-3, seed: int = 0, eval_every: int = 10) -> TrainingRun:
    """Train a fresh `task.model(seed)` with `make_optimizer(name, ...)` on the batches
    `batch_order(..., seed)`: every optimizer starts from the same weights and sees the same data
    in the same order; K-FAC's and MKOR's sampled labels (fisher="mc") are seeded by `seed`.
    `inverse_every=None` is the optimizer's default (`default_inverse_every`).

    Evaluations (the loss on the whole training set, the test loss and accuracy) happen at step
    0, after steps eval_every/2, 3 eval_every/2, ..., and at the end; they are not timed.
    Each step records its wall-clock time and its CPU time (`TrainingRun`).

    The closure follows each optimizer's contract: hesskit's optimizers differentiate the loss
    themselves (and with fisher="mc" take (loss, logits)); torch's need `loss.backward()`. A
    non-finite loss stops the run (`diverged`; what is left stays nan).
    """
    return train_together(task, [dict(name=name, lr=lr)], steps=steps, batch_size=batch_size, damping=damping,
                          factor_every=factor_every, inverse_every=inverse_every, fisher=fisher, kl_clip=kl_clip,
                          seed=seed, eval_every=eval_every)[0]


def lr_sweep(task: DigitsTask, names: Sequence[str], lrs: Sequence[float], steps: int = 300,
             **kwargs) -> dict[str, list[TrainingRun]]:
    """`train` for every optimizer and every learning rate of one grid (same seed, data, init),
    all runs interleaved by `train_together` so that their wall-clock times are comparable."""
    configs = [dict(name=name, lr=lr) for name in names for lr in lrs]
    runs = iter(train_together(task, configs, steps=steps, **kwargs))
    return {name: [next(runs) for _ in lrs] for name in names}


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


# --------------------------------------------------------------------------- the explorer
class KFACExplorer(Explorer):
    """K-FAC's and MKOR's knobs against tuned SGD-momentum and AdamW on one task: training loss
    against steps and against seconds, test accuracy, and the wall time of every step."""


    def __init__(self, task: DigitsTask | None = None, steps: int = 300, kfac_lr: float = 1e-3, mkor_lr: float = 0.3,
                 damping: float = 1e-3, factor_every: int = 10, inverse_every: int = 100, mkor_every: int = 10,
                 fisher: str = "empirical",
                 baseline_lrs: dict[str, float] | None = None, show: Sequence[str] = OPTIMIZERS,
                 lr_range: tuple[float, float] = (-4, 0), damping_range: tuple[float, float] = (-5, 0),
                 max_factor_every: int = 50, max_inverse_every: int = 200, batch_size: int = 64, seed: int = 0,
                 eval_every: int = 10):
        import ipywidgets as widgets

        self.task = digits_task() if task is None else task
        self.steps, self.batch_size, self.seed, self.eval_every = steps, batch_size, seed, eval_every
        self.baseline_lrs = {"sgd": 0.3, "adamw": 3e-2, **(baseline_lrs or {})}
        self._cache: dict[tuple, TrainingRun] = {}
        style = {"description_width": "initial"}
        slider = dict(continuous_update=False, style=style)
        lr = dict(base=10, min=lr_range[0], max=lr_range[1], step=0.25, readout_format=".2g", **slider)
        super().__init__({
            "kfac_lr": widgets.FloatLogSlider(value=kfac_lr, description="K-FAC lr", **lr),
            "mkor_lr": widgets.FloatLogSlider(value=mkor_lr, description="MKOR lr", **lr),
            "damping": widgets.FloatLogSlider(value=damping, base=10, min=damping_range[0], max=damping_range[1],
                                              step=0.5, description="K-FAC damping", readout_format=".0e", **slider),
            "factor_every": widgets.IntSlider(value=factor_every, min=1, max=max_factor_every,
                                              description="K-FAC factor_every", **slider),
            "inverse_every": widgets.IntSlider(value=inverse_every, min=1, max=max_inverse_every,
                                               description="K-FAC inverse_every", **slider),
            "mkor_every": widgets.IntSlider(value=mkor_every, min=1, max=max_inverse_every,
                                            description="MKOR inverse_every", **slider),
            "fisher": widgets.ToggleButtons(options=["empirical", "mc"], value=fisher, description="fisher",
                                            style=style),
            "show": widgets.SelectMultiple(options=[(LABELS[n], n) for n in OPTIMIZERS], value=tuple(show),
                                           rows=4, description="show", style=style),
        })

    def add_runs(self, runs: Sequence[TrainingRun]) -> None:
        """Reuse runs trained elsewhere (a learning-rate sweep on the same task) instead of training
        them again; a run is used when all its settings match the controls'."""
        for r in runs:
            self._cache[self._key(r.name, r.lr, r.settings)] = r

    @staticmethod
    def _key(name: str, lr: float, settings: dict) -> tuple:
        return (name, f"{lr:.6g}", tuple(sorted((k, f"{v:.6g}" if isinstance(v, float) else v)
                                                 for k, v in settings.items())))

    def _settings(self, name: str, **options) -> dict:
        """`train`'s arguments (besides name and lr) for `name` under the controls' `options`."""
        settings = {"batch_size": self.batch_size, "seed": self.seed, "steps": self.steps,
                    "eval_every": self.eval_every}
        if name == "kfac":
            settings.update(damping=options["damping"], factor_every=options["factor_every"],
                            inverse_every=options["inverse_every"], fisher=options["fisher"], kl_clip=1e-3)
        elif name == "mkor":
            settings.update(inverse_every=options["mkor_every"], fisher=options["fisher"])
        return settings

    def compute(self, kfac_lr: float, mkor_lr: float, damping: float, factor_every: int, inverse_every: int,
                mkor_every: int, fisher: str, show: Sequence[str]) -> dict:
        options = dict(damping=damping, factor_every=factor_every, inverse_every=inverse_every,
                       mkor_every=mkor_every, fisher=fisher)
        lrs = {"kfac": kfac_lr, "mkor": mkor_lr, **self.baseline_lrs}
        wanted = [(name, lrs[name], self._settings(name, **options)) for name in OPTIMIZERS if name in show]
        missing = [(name, lr, settings) for name, lr, settings in wanted
                   if self._key(name, lr, settings) not in self._cache]
        trained = train_together(self.task, [dict(name=name, lr=lr, **settings) for name, lr, settings in missing])
        self.add_runs(trained)  # K-FAC and MKOR, when both changed, are trained side by side
        runs = [self._cache[self._key(name, lr, settings)] for name, lr, settings in wanted]
        timing = {r.name: {"median": r.step_time(), "mean": r.step_time(statistic="mean"),
                           "max": r.step_time(statistic="max"), **{kind: r.step_time(kind) for kind in KINDS}}
                  for r in runs}
        return {
            "runs": runs,
            "final_loss": {r.name: r.final_loss for r in runs},
            "final_accuracy": {r.name: r.final_accuracy for r in runs},
            "timing": timing,
            "settings": dict(kfac_lr=kfac_lr, mkor_lr=mkor_lr, damping=damping, factor_every=factor_every,
                             inverse_every=inverse_every, mkor_every=mkor_every, fisher=fisher),
        }

    @staticmethod
    def _milliseconds_axis(ax) -> None:
        """A log-scaled y axis labelled 0.2, 0.5, 1, 2, 5 ... (plain numbers: readable, and no
        mathtext to lay out on every render), with room for the legend above the data."""
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * (high / low) ** 0.35)  # headroom for the legend above the data
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 7.6))
        grid = fig.add_gridspec(2, 3, left=0.06, right=0.99, bottom=0.08, top=0.9, wspace=0.28, hspace=0.38)
        ax_steps, ax_time, ax_acc = (fig.add_subplot(grid[0, i]) for i in range(3))
        ax_trace = fig.add_subplot(grid[1, :2])
        ax_bars = fig.add_subplot(grid[1, 2])
        runs = result["runs"]
        s = result["settings"]
        for run in runs:
            label = run.label + (" (diverged)" if run.diverged else "")
            color = COLORS[run.name]
            ax_steps.semilogy(run.eval_steps, run.train_loss, color=color, label=label)
            ax_time.semilogy(run.eval_seconds, run.train_loss, color=color, label=label)
            ax_acc.plot(run.eval_steps, 100 * run.test_accuracy, color=color, label=label)
            median, longest = 1e3 * run.step_time(), 1e3 * run.step_time(statistic="max")
            text = f"{LABELS[run.name]}: median {median:.2f} ms, max {longest:.1f} ms"
            if run.name in ("kfac", "mkor"):
                steps = np.arange(1, len(run.step_cpu_seconds) + 1)
                ms = 1e3 * run.step_cpu_seconds
                ax_trace.plot(steps, ms, color=color, lw=0.7, alpha=0.8, label=text)
                for kind, marker in (("factors", "."), ("inverse", "v")):
                    chosen = run.kinds == kind
                    ax_trace.plot(steps[chosen], ms[chosen], marker, color=color, ms=7 if kind == "inverse" else 4)
            else:
                ax_trace.axhline(median, color=color, ls="--", lw=1.2, label=text)
        if not runs:
            ax_steps.text(0.5, 0.5, "select at least one optimizer\nunder 'show'", ha="center", va="center",
                          transform=ax_steps.transAxes)
        ax_steps.set_xlabel("optimizer steps")
        ax_time.set_xlabel("training wall-clock time (s)")
        for ax in (ax_steps, ax_time):
            ax.set_ylabel("training-set loss (cross-entropy)")
        ax_steps.set_title("loss against steps", fontsize=10)
        ax_time.set_title("loss against wall-clock seconds", fontsize=10)
        ax_acc.set_xlabel("optimizer steps")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(50, 100)
        finals = ", ".join(f"{LABELS[r.name]} {100 * r.final_accuracy:.1f}%" for r in runs)
        ax_acc.set_title(f"final: {finals}" if runs else "test accuracy", fontsize=8)
        if runs:
            ax_steps.legend(fontsize=7)
            ax_trace.legend(fontsize=7, loc="upper right")
        if runs:
            self._milliseconds_axis(ax_trace)
        ax_trace.set_xlabel("optimizer step")
        ax_trace.set_ylabel("CPU time of the step (ms)")
        ax_trace.set_title(f"cost of every step (dashed: baselines' medians). Dots: factor steps (K-FAC, every "
                           f"{s['factor_every']}); triangles: inverse steps (K-FAC eigh every "
                           f"{s['inverse_every']}, MKOR rank-1 every {s['mkor_every']})", fontsize=9)
        names = [r.name for r in runs]
        x = np.arange(len(names))
        width = 0.8 / len(KINDS)
        for k, kind in enumerate(KINDS):
            heights = np.array([1e3 * result["timing"][n][kind] for n in names])
            shown = np.isfinite(heights)
            ax_bars.bar(x[shown] + (k - 1) * width, heights[shown], width, color=["0.8", "0.55", "0.25"][k],
                        label=f"median, {kind} steps")
        ax_bars.plot(x, [1e3 * result["timing"][n]["mean"] for n in names], "k_", ms=20, mew=2,
                     label="mean over all steps")
        ax_bars.plot(x, [1e3 * result["timing"][n]["max"] for n in names], "rv", ms=6, label="slowest step")
        if runs:
            self._milliseconds_axis(ax_bars)
        ax_bars.set_xticks(x, [LABELS[n] for n in names], fontsize=8)
        ax_bars.set_ylabel("CPU time per step (ms)")
        ax_bars.set_title("time per step, by what the step did", fontsize=10)
        ax_bars.legend(fontsize=7)
        fig.suptitle(f"{self.task.architecture.upper()} on digits, {self.task.num_params} parameters, batch "
                     f"{self.batch_size}: K-FAC damping {s['damping']:.0e}, fisher = {s['fisher']}", fontsize=11)
        return fig
