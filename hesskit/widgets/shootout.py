"""Notebook 10: the optimizer shootout, a fair comparison protocol and its harness.

Comparisons of optimizers go wrong in a few well-documented ways: unequal tuning budgets, weak
baselines, one seed, steps instead of seconds, and a target chosen after the results are in
(Schmidt, Schneider & Hennig, "Descending through a crowded valley: benchmarking deep learning
optimizers", ICML 2021; Dahl et al., "Benchmarking neural network training algorithms", 2023,
the AlgoPerf benchmark; Kaddour, Key, Nawrot, Minervini & Kusner, "No train no gain: revisiting
efficient training algorithms for transformer-based language models", NeurIPS 2023). This module
is a small harness that makes the fair protocol the easy path:

* `REGISTRY`: name -> `Entry` (how to build the optimizer, which closure it needs, the centre of
  its lr grid). The entries, grid factors and target rule are those of `bench/optimizers.py`, so
  the notebook and the benchmark run the same protocol (on smaller models and budgets).
* `digits_task` / `char_lm_task`: the two tasks (a few-channel `SmallCNN` on the scikit-learn
  digits, a tiny `CharTransformerLM` on `hk.data.text`).
* `train_run`: one (optimizer, lr, seed) run; `run_grid`: every optimizer x lr x seed, on the same
  initialisations and batch orders, each optimizer's grid optionally located by a coarse pilot that
  is the same for everyone (coarse-to-fine search: equal budgets, no hand-picked learning rates).
* `summarise`: a pure function of the stored runs: best lr by median final training loss, steps
  and seconds to a target loss, test metric with its spread over seeds, per-step time relative
  to AdamW, divergence counts.
* `ShootoutExplorer`: the widget, which only re-summarises and re-plots the stored runs (and trains
  extra runs only for learning rates between the grid points, which it marks as extra tuning).
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import char_windows, digits, text
from ..models import CharTransformerLM, SmallCNN
from ..optim import KFAC, MFAC, MKOR, AdaHessian, NewtonCG, Sophia
from ..optim.closures import CLOSURES, make_closure
from .explorer import Explorer
from .. import progress

__all__ = [
    "BEST",
    "CLOSURES",
    "Entry",
    "Grid",
    "LR_FACTORS",
    "PILOT_FACTORS",
    "REGISTRY",
    "Row",
    "Run",
    "ShootoutExplorer",
    "Summary",
    "TARGET_FRACTION",
    "Task",
    "batch_indices",
    "best_lr",
    "char_lm_task",
    "digits_task",
    "entry",
    "loss_at",
    "reach",
    "run_grid",
    "summarise",
    "target_loss",
    "train_run",
]

LR_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)  # the same 5-point grid around each optimizer's default lr
TARGET_FRACTION = 0.6  # target = AdamW's median training loss (best lr) at 60% of the step budget
REFERENCE = "AdamW"


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Entry:
    """One optimizer of the shootout: how to build it, which closure it needs, its lr grid.

    `closure` is "backward" (torch.optim: the closure calls `loss.backward()`), "loss" (hesskit's
    contract: the closure returns the loss and the optimizer differentiates it) or "loss_outputs"
    (the closure returns `(loss, logits)`: Sophia-G, Newton-CG with the GGN). `centre` is the centre
    of the lr grid: the constructor's default lr unless given.
    """

    cls: type
    kwargs: dict = field(default_factory=dict)
    closure: str = "loss"
    takes_model: bool = False  # K-FAC and MKOR take the model (hooks on its layers), the others its parameters
    centre: float = 1e-3

    def make(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The factory: a fresh optimizer for `model` with learning rate `lr`."""
        return self.cls(model if self.takes_model else model.parameters(), lr=lr, **self.kwargs)

    def grid(self, factors: Sequence[float] = LR_FACTORS) -> list[float]:
        """The learning rates tried: `centre` times each factor."""
        return [self.centre * f for f in factors]

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__module__.split('.')[0]}.{self.cls.__name__}({args})"


def entry(cls: type, closure: str = "loss", takes_model: bool = False, lr: float | None = None, **kwargs: Any) -> Entry:
    """A registry entry for `cls`; `lr=None` centres the grid on the constructor's default lr."""
    if closure not in CLOSURES:
        raise ValueError(f"closure: expected one of {CLOSURES}, got {closure!r}")
    centre = inspect.signature(cls).parameters["lr"].default if lr is None else lr
    if isinstance(centre, bool) or not isinstance(centre, (int, float)) or not centre > 0:
        raise ValueError(f"{cls.__name__} has no usable default lr ({centre!r}): pass lr=")
    return Entry(cls, dict(kwargs), closure, takes_model, float(centre))


# The same entries as bench/optimizers.py's REGISTRY (names, settings, closures, grid centres), less its BENCH_ONLY.
REGISTRY: dict[str, Entry] = {
    "SGD (momentum 0.9)": entry(torch.optim.SGD, "backward", lr=0.1, momentum=0.9),
    "AdamW": entry(torch.optim.AdamW, "backward"),
    "AdaHessian": entry(AdaHessian),
    "Sophia-H (Hutchinson, k=10)": entry(Sophia, estimator="hutchinson"),
    "Sophia-G (GNB, k=10)": entry(Sophia, "loss_outputs", estimator="gnb"),
    "K-FAC (f=10, i=100)": entry(KFAC, takes_model=True),
    "MKOR": entry(MKOR, takes_model=True),
    "M-FAC (m=32)": entry(MFAC, num_grads=32),
    "Newton-CG (GGN, 10 CG iters)": entry(NewtonCG, "loss_outputs", curvature="ggn", max_cg_iters=10),
}


# --------------------------------------------------------------------------- the tasks
@dataclass
class Task:
    """A training problem: a model factory, training data, a fixed "training loss" subset, test data."""

    name: str
    make_model: Callable[[], nn.Module]
    train: tuple[Tensor, Tensor]  # minibatches are drawn from here
    train_eval: tuple[Tensor, Tensor]  # the training loss is measured here
    test: tuple[Tensor, Tensor]
    metric: str  # "accuracy" (%, higher is better) or "bits/char" (lower is better)

    def model(self, seed: int) -> nn.Module:
        """A fresh model after `torch.manual_seed(seed)`: the same weights for every optimizer."""
        torch.manual_seed(seed)
        return self.make_model()

    @staticmethod
    def loss(outputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and the flattened logits it was computed from."""
        logits = outputs.flatten(0, -2)
        return F.cross_entropy(logits, y.flatten()), logits

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
        """(mean cross-entropy, metric): accuracy in % or bits per character."""
        x, y = data
        loss, logits = self.loss(model(x), y)
        if self.metric == "accuracy":
            return loss.item(), 100.0 * (logits.argmax(-1) == y.flatten()).double().mean().item()
        return loss.item(), loss.item() / math.log(2)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model(0).parameters())


def digits_task(channels: tuple[int, int] = (4, 8), eval_size: int | None = None) -> Task:
    """`SmallCNN(channels)` (tanh, 2x2 max-pool; (4, 8) channels: 666 parameters) on the 8 x 8
    digits (1,438 training and 359 test images). The training loss is measured on the first
    `eval_size` training images (None: all of them)."""
    (x, y), (x_test, y_test) = digits(seed=0)
    sub = slice(None) if eval_size is None else slice(0, eval_size)
    c = tuple(channels)
    return Task(f"digits, SmallCNN{c}", lambda: SmallCNN(c), (x, y), (x[sub], y[sub]), (x_test, y_test), "accuracy")


def char_lm_task(num_chars: int = 20_000, length: int = 32, dim: int = 16, blocks: int = 1, heads: int = 2,
                 mlp_ratio: int = 2, eval_windows: int = 128) -> Task:
    """Next-character prediction on `hk.data.text(num_chars)` (26 characters), windows of `length`,
    last 10% held out, with a `CharTransformerLM` of the given shape. The training loss is measured
    on the first `eval_windows` training windows."""
    (x, y), (x_test, y_test), vocab = char_windows(text(num_chars, seed=0), length)
    size = dict(dim=dim, blocks=blocks, heads=heads, mlp_ratio=mlp_ratio)
    return Task(f"char LM, {blocks} block(s) of width {dim}",
                lambda: CharTransformerLM(len(vocab), max_length=length, **size),
                (x, y), (x[:eval_windows], y[:eval_windows]), (x_test, y_test), "bits/char")


# --------------------------------------------------------------------------- one run
def batch_indices(num_samples: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """(steps, batch_size) minibatch indices, drawn with replacement from a generator seeded by
    `seed`, one step after another (as bench/optimizers.py): every optimizer sees the same batches."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(num_samples, (batch_size,), generator=gen) for _ in range(steps)])


@dataclass
class Run:
    """One (optimizer, lr, seed) run. `steps[j]`, `train_loss[j]`, `seconds[j]`: the recorded
    points (step 0 first), with the seconds spent inside `opt.step` so far (evaluation excluded).
    A diverged run keeps the points recorded before it diverged; `status` says how it ended."""

    optimizer: str
    lr: float
    seed: int
    status: str  # "ok", "diverged" or "error"
    steps: np.ndarray
    train_loss: np.ndarray
    seconds: np.ndarray
    steps_taken: int
    total_seconds: float
    test_loss: float = math.nan
    test_metric: float = math.nan
    message: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def final_loss(self) -> float:
        """The last training loss of a finished run; inf if it diverged or failed (what tuning minimises)."""
        return float(self.train_loss[-1]) if self.ok else math.inf

    @property
    def step_time(self) -> float:
        """Mean seconds per optimizer step (amortised: curvature refreshes included)."""
        return self.total_seconds / self.steps_taken if self.steps_taken else math.nan


def train_run(task: Task, name: str, lr: float, seed: int, steps: int, batch_size: int, record_every: int = 10,
              registry: dict[str, Entry] | None = None) -> Run:
    """Train `task.model(seed)` with `registry[name].make(model, lr)` for `steps` steps on the
    batches `batch_indices(..., seed)`; record the training loss every `record_every` steps.

    Divergence, as in bench/optimizers.py: a FloatingPointError from hesskit's closure check, a
    non-finite loss, or a final training loss above the initial one. Any other exception ends the
    run with status "error" (it counts as diverged when tuning). Warnings (e.g. K-FAC's fallback
    layers) are collected in `Run.warnings`, not shown."""
    registry = REGISTRY if registry is None else registry
    if steps < 1 or batch_size < 1 or record_every < 1:
        raise ValueError(f"steps, batch_size, record_every: expected positive integers, got {steps}, {batch_size}, "
                         f"{record_every}")
    spec = registry[name]
    x, y = task.train
    order = batch_indices(len(x), steps, batch_size, seed)
    points: list[tuple[int, float, float]] = []
    elapsed, taken, status, message = 0.0, 0, "ok", ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = task.model(seed)
        try:
            opt = spec.make(model, lr)
            points.append((0, task.evaluate(model, task.train_eval)[0], 0.0))
            for step in range(1, steps + 1):
                xb, yb = x[order[step - 1]], y[order[step - 1]]

                closure = make_closure(spec.closure, opt, lambda: task.loss(model(xb), yb))
                start = time.perf_counter()
                try:
                    loss = opt.step(closure)
                except FloatingPointError as err:
                    status, message = "diverged", str(err)
                finally:
                    elapsed += time.perf_counter() - start
                    taken = step
                value = math.nan if loss is None else float(loss.detach() if isinstance(loss, Tensor) else loss)
                if status == "ok" and loss is not None and not math.isfinite(value):
                    status, message = "diverged", f"loss {value} at step {step}"
                if status != "ok":
                    break
                if step % record_every == 0 or step == steps:
                    current = task.evaluate(model, task.train_eval)[0]
                    points.append((step, current if math.isfinite(current) else math.nan, elapsed))
            if status == "ok" and not points[-1][1] <= points[0][1]:  # nan, or above the start: blown up
                status, message = "diverged", f"final training loss {points[-1][1]:.4g} > initial {points[0][1]:.4g}"
        except Exception as err:  # noqa: BLE001 (one failing optimizer must not stop the shootout)
            status, message = "error", f"{type(err).__name__}: {err}"
    test_loss, metric = task.evaluate(model, task.test) if status == "ok" else (math.nan, math.nan)
    arr = np.array(points, dtype=float).reshape(-1, 3)
    return Run(name, float(lr), int(seed), status, arr[:, 0].astype(int), arr[:, 1], arr[:, 2], taken, elapsed,
               test_loss, metric, message, tuple(sorted({str(w.message).splitlines()[0] for w in caught})))


# --------------------------------------------------------------------------- the grid
@dataclass
class Grid:
    """Every run of a shootout: `runs[(name, lr, seed)]`, with the protocol that produced them.

    `centres[name]` is the centre of the optimizer's lr grid (its default lr, or the winner of the
    pilot); `pilot[(name, lr)]` holds the pilot runs. `extra` holds runs at learning rates outside
    the grid (trained on request; never used to pick the best lr, since that would give one
    optimizer a bigger tuning budget)."""

    task: Task
    names: list[str]
    seeds: list[int]
    factors: list[float]
    steps: int
    batch_size: int
    record_every: int
    registry: dict[str, Entry]
    centres: dict[str, float]
    runs: dict[tuple[str, float, int], Run]
    pilot: dict[tuple[str, float], Run] = field(default_factory=dict)
    pilot_steps: int = 0
    extra: dict[tuple[str, float, int], Run] = field(default_factory=dict)
    wall_seconds: float = math.nan

    def lrs(self, name: str) -> list[float]:
        return [self.centres[name] * f for f in self.factors]

    def centre(self, name: str) -> float:
        return self.centres[name]

    def default(self, name: str) -> float:
        """The optimizer's own default lr (the registry's centre)."""
        return self.registry[name].centre

    def train(self, name: str, lr: float, seed: int) -> Run:
        """One more run under exactly this grid's protocol."""
        return train_run(self.task, name, lr, seed, self.steps, self.batch_size, self.record_every, self.registry)

    def runs_at(self, name: str, lr: float) -> list[Run]:
        """The runs of `name` at `lr` for every seed: from the grid, else from `extra` (trained now if missing)."""
        missing = [s for s in self.seeds if (name, lr, s) not in self.runs and (name, lr, s) not in self.extra]
        for k, seed in enumerate(missing):
            progress.report(k, len(missing), f"{name}, lr {lr:.3g}: extra run")  # shown while an explorer renders
            self.extra[(name, lr, seed)] = self.train(name, lr, seed)
        if missing:
            progress.report(len(missing), len(missing), f"{name}, lr {lr:.3g}: extra run")
        return [self.runs.get((name, lr, s)) or self.extra[(name, lr, s)] for s in self.seeds]

    def on_grid(self, name: str, lr: float) -> bool:
        return any(math.isclose(lr, g, rel_tol=1e-9) for g in self.lrs(name))

    def num_runs(self) -> dict[str, tuple[int, int]]:
        """Tuning budget per optimizer: (pilot runs, grid runs)."""
        return {n: (sum(k[0] == n for k in self.pilot), sum(k[0] == n for k in self.runs)) for n in self.names}


PILOT_FACTORS = (1 / 81, 1 / 9, 1.0, 9.0, 81.0)  # coarse: 5 lrs spaced x9 around the default


def run_grid(task: Task, names: Iterable[str] | None = None, seeds: Sequence[int] = (0, 1, 2), steps: int = 150,
             batch_size: int = 64, record_every: int = 10, factors: Sequence[float] = LR_FACTORS,
             pilot_factors: Sequence[float] | None = None, pilot_steps: int | None = None,
             centres: dict[str, float] | None = None, registry: dict[str, Entry] | None = None,
             verbose: bool = False) -> Grid:
    """Train every optimizer of `names` (default: the whole registry) at every lr of its grid
    (`centre * factors`: the same number of trials for everyone, baselines included) and every seed.

    The centre is the optimizer's default lr (`centres` overrides it), unless `pilot_factors` is
    given: then a coarse pilot, identical for every optimizer (seed `seeds[0]`, `pilot_steps`
    steps, default steps // 2, lrs default * pilot_factors), picks the centre by the lowest final
    training loss (coarse-to-fine search: the same budget for everyone, and no hand-picked lr).

    The loops run seed by seed and lr factor by lr factor, with all optimizers in turn inside, so
    that a slow stretch of a shared machine slows every optimizer alike (their seconds stay
    comparable)."""
    registry = REGISTRY if registry is None else registry
    names = list(registry) if names is None else list(names)
    unknown = [n for n in names if n not in registry]
    if unknown or not names:
        raise ValueError(f"names: expected registry names {list(registry)}, got {unknown or names}")
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    start = time.perf_counter()
    centres = {n: float((centres or {}).get(n, registry[n].centre)) for n in names}
    pilot: dict[tuple[str, float], Run] = {}
    pilot_steps = max(1, steps // 2) if pilot_steps is None else int(pilot_steps)
    if pilot_factors:
        for factor in pilot_factors:
            for name in names:
                lr = centres[name] * factor
                pilot[(name, lr)] = train_run(task, name, lr, seeds[0], pilot_steps, batch_size, record_every,
                                              registry)
        for name in names:
            scores = {lr: r.final_loss for (n, lr), r in pilot.items() if n == name}
            centres[name] = min(scores, key=lambda lr: (scores[lr], lr))
        if verbose:
            print(f"pilot done: {len(pilot)} runs, {time.perf_counter() - start:.0f} s")
    runs = {}
    for seed in seeds:
        for factor in factors:
            for name in names:
                lr = centres[name] * factor
                runs[(name, lr, seed)] = train_run(task, name, lr, seed, steps, batch_size, record_every, registry)
        if verbose:
            print(f"seed {seed} done: {len(runs)} runs, {time.perf_counter() - start:.0f} s")
    return Grid(task, names, list(seeds), list(factors), steps, batch_size, record_every, registry, centres, runs,
                pilot, pilot_steps if pilot_factors else 0, wall_seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- the summary
def reach(run: Run, target: float) -> tuple[float, float]:
    """(steps, seconds) at the first recorded point with training loss <= target; (inf, inf) if never."""
    for step, loss, sec in zip(run.steps, run.train_loss, run.seconds):
        if loss <= target:
            return float(step), float(sec)
    return math.inf, math.inf


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if len(values) else math.inf


def loss_at(run: Run, step: int) -> float:
    """The training loss at the first recorded step >= `step` (inf if the run did not get there)."""
    if not run.ok:
        return math.inf
    return next((float(loss) for s, loss in zip(run.steps, run.train_loss) if s >= step), math.inf)


def best_lr(grid: Grid, name: str) -> tuple[float, dict[float, float]]:
    """The grid lr with the lowest median (over seeds) final training loss, and every lr's score.
    Diverged runs count as inf; ties go to the smaller lr."""
    scores = {lr: _median([grid.runs[(name, lr, s)].final_loss for s in grid.seeds]) for lr in grid.lrs(name)}
    return min(scores, key=lambda lr: (scores[lr], lr)), scores


def target_loss(grid: Grid, fraction: float = TARGET_FRACTION, reference: str = REFERENCE) -> float:
    """The rule fixed before looking at any result: the reference optimizer's (AdamW's) median
    training loss, at its best lr, after `fraction` of the step budget (bench/optimizers.py's rule)."""
    if reference not in grid.names:
        raise ValueError(f"reference: {reference!r} is not in the grid; pass target= explicitly")
    lr, _ = best_lr(grid, reference)
    step = round(fraction * grid.steps)
    return _median([loss_at(grid.runs[(reference, lr, s)], step) for s in grid.seeds])


@dataclass
class Row:
    """The summary of one optimizer at its chosen lr (every statistic over the seeds)."""

    name: str
    lr: float
    best_lr: float
    centre: float  # the centre of its lr grid
    default: float  # its default lr (the registry's)
    chosen: str  # "best from grid", "grid" (picked by hand) or "extra" (off the grid: extra tuning)
    best_at_edge: bool  # the best lr is the smallest or largest of the grid: the grid may be too narrow
    scores: dict[float, float]  # grid lr -> median final training loss
    runs: list[Run]
    final_loss: float  # median over seeds (inf if the median seed diverged)
    steps_to_target: float  # median over seeds (inf: the median seed never got there)
    seconds_to_target: float
    hits: int  # seeds that reached the target
    metric_mean: float  # test metric over the seeds that finished
    metric_std: float
    finished: int  # seeds that finished (neither diverged nor failed)
    step_time: float  # median, over every run of this optimizer's grid, of the mean seconds per step
    step_ratio: float  # step_time / the reference's
    diverged_grid: int  # diverged or failed runs over the whole grid of this optimizer
    total_grid: int
    errors: list[str]

    @property
    def divergence_fraction(self) -> float:
        return self.diverged_grid / self.total_grid if self.total_grid else math.nan

    def curve(self, axis: str = "steps") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, mean, low, high) of the training loss over the finished seeds: x = recorded steps or
        mean seconds; low/high = min/max over seeds. Empty if no seed finished."""
        ok = [r for r in self.runs if r.ok]
        if not ok:
            return (np.zeros(0),) * 4
        n = min(len(r.steps) for r in ok)
        losses = np.array([r.train_loss[:n] for r in ok])
        x = ok[0].steps[:n].astype(float) if axis == "steps" else np.mean([r.seconds[:n] for r in ok], axis=0)
        return x, losses.mean(axis=0), losses.min(axis=0), losses.max(axis=0)


@dataclass
class Summary:
    """`summarise`'s answer: one `Row` per optimizer, the target and how it was set."""

    rows: dict[str, Row]
    target: float
    target_rule: str
    metric: str
    reference: str

    def winner(self, by: str = "steps") -> str | None:
        """The optimizer that reached the target first (median over seeds), by "steps" or "seconds"."""
        key = {"steps": lambda r: r.steps_to_target, "seconds": lambda r: r.seconds_to_target}[by]
        reached = [r for r in self.rows.values() if math.isfinite(key(r))]
        return min(reached, key=key).name if reached else None

    def table(self) -> str:
        """The summary as a plain-text table."""
        metric = "test acc. %" if self.metric == "accuracy" else "test bits/char"
        head = (f"{'optimizer':29s} {'lr':>9s} {'final loss':>10s} {'steps to':>9s} {'s to':>6s} {metric:>15s} "
                f"{'step x AdamW':>12s} {'diverged':>8s}")
        lines = [f"target training loss {self.target:.4f} ({self.target_rule})", head, "-" * len(head)]
        decimals = 1 if self.metric == "accuracy" else 3
        for r in self.rows.values():
            star = "*" if r.best_at_edge and r.chosen == "best from grid" else " "
            mark = {"best from grid": "", "grid": " (hand)", "extra": " (extra)"}[r.chosen]
            steps = f"{r.steps_to_target:.0f}" if math.isfinite(r.steps_to_target) else "never"
            secs = f"{r.seconds_to_target:.2f}" if math.isfinite(r.seconds_to_target) else "-"
            acc = f"{r.metric_mean:.{decimals}f} +- {r.metric_std:.{decimals}f}" if r.finished else "-"
            lines.append(f"{(r.name + mark)[:29]:29s} {r.lr:8.3g}{star} {r.final_loss:10.4f} {steps:>6s} {r.hits}/"
                         f"{len(r.runs)} {secs:>6s} {acc:>15s} {r.step_ratio:11.2f}x "
                         f"{r.diverged_grid:>4d}/{r.total_grid}")
        lines.append("* best lr at the edge of the grid. Steps/seconds to target: median over seeds "
                     "(hits = seeds that reached it); diverged: runs of the whole lr grid.")
        return "\n".join(lines)


def summarise(grid: Grid, lrs: dict[str, float | None] | None = None, target: float | None = None,
              names: Iterable[str] | None = None, reference: str = REFERENCE) -> Summary:
    """Summarise stored runs (no training, except runs at off-grid lrs requested in `lrs`).

    For each optimizer of `names` (default: all of the grid's): the best grid lr (lowest median
    final training loss over seeds), the chosen lr (`lrs[name]`, or the best when None/absent), and
    at the chosen lr: median final loss, median steps and seconds to `target` (default: the
    `target_loss` rule, fixed in advance), test metric mean +- std over the finished seeds; and over
    the whole lr grid: the number of diverged runs, and the step time (the median over all its runs
    of each run's mean seconds per step: 15 runs spread over the whole grid, so that a slow moment
    of a shared machine hardly moves it) and its ratio to the reference's."""
    lrs = dict(lrs or {})
    names = list(grid.names) if names is None else list(names)
    rule = f"fixed: {target:.4g}" if target is not None else \
        f"{reference}'s median training loss at step {round(TARGET_FRACTION * grid.steps)} of {grid.steps}"
    target = target_loss(grid, reference=reference) if target is None else float(target)
    rows = {}
    for name in dict.fromkeys(names + ([reference] if reference in grid.names else [])):
        best, scores = best_lr(grid, name)
        chosen_lr = lrs.get(name)
        lr = best if chosen_lr is None else float(chosen_lr)
        kind = "best from grid" if chosen_lr is None else ("grid" if grid.on_grid(name, lr) else "extra")
        if kind == "grid":
            lr = min(grid.lrs(name), key=lambda g: abs(math.log(g / lr)))  # the exact grid key
        runs = grid.runs_at(name, lr)
        reached = [reach(r, target) if r.ok else (math.inf, math.inf) for r in runs]
        ok = [r for r in runs if r.ok]
        metrics = [r.test_metric for r in ok]
        grid_runs = [grid.runs[(name, g, s)] for g in grid.lrs(name) for s in grid.seeds]
        rows[name] = Row(
            name=name, lr=lr, best_lr=best, centre=grid.centre(name), default=grid.default(name), chosen=kind,
            best_at_edge=best in (grid.lrs(name)[0], grid.lrs(name)[-1]), scores=scores, runs=runs,
            final_loss=_median([r.final_loss for r in runs]),
            steps_to_target=_median([a for a, _ in reached]), seconds_to_target=_median([b for _, b in reached]),
            hits=sum(math.isfinite(a) for a, _ in reached),
            metric_mean=float(np.mean(metrics)) if metrics else math.nan,
            metric_std=float(np.std(metrics, ddof=1)) if len(metrics) > 1 else (0.0 if metrics else math.nan),
            finished=len(ok), step_time=_median([r.step_time for r in grid_runs if r.steps_taken]), step_ratio=math.nan,
            diverged_grid=sum(not r.ok for r in grid_runs), total_grid=len(grid_runs),
            errors=[f"lr {r.lr:.3g}, seed {r.seed}: {r.message}" for r in grid_runs if r.status == "error"],
        )
    ref_time = rows[reference].step_time if reference in rows else math.nan
    for row in rows.values():
        row.step_ratio = row.step_time / ref_time if ref_time > 0 else math.nan
    rows = {name: rows[name] for name in names}
    return Summary(rows, target, rule, grid.task.metric, reference)


# --------------------------------------------------------------------------- the widget
COLORS = dict(zip(REGISTRY, ["tab:gray", "tab:blue", "tab:red", "tab:orange", "tab:brown", "tab:green", "tab:olive",
                             "tab:purple", "tab:cyan"]))
# lr choices: the grid factors, and the half steps between them (extra runs: not part of the fair budget).
# "Best from grid" is a string, not None: a Dropdown whose value is None shows a blank selection.
BEST = "best from grid"
LR_OPTIONS = [(BEST, BEST)] + [
    (f"grid centre x {f:.3g}" + ("" if any(math.isclose(f, g) for g in LR_FACTORS) else " (extra run)"), f)
    for f in (1 / 9, 3**-1.5, 1 / 3, 3**-0.5, 1.0, 3**0.5, 3.0, 3**1.5, 9.0)
]


def _log_tick_labels(ax) -> None:
    """Plain-number labels on a log y axis; label the 2 and 5 minor ticks too when it spans under two decades."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    if low > 0 and high / low < 100:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


class ShootoutExplorer(Explorer):
    """The stored grid, re-summarised: pick the optimizers, each one's lr ("best from grid", a grid
    point, or a point between grid points, which trains 3 extra runs), the x axis and the target.

    Shows the training loss (mean over seeds and min-max band) against steps or seconds, the lr
    sensitivity curves (median final loss over the grid), and the summary table."""


    def __init__(self, grid: Grid, target: float | None = None, selected: Sequence[str] | None = None):
        import ipywidgets as widgets

        self.grid = grid
        self.default_target = target_loss(grid) if target is None else float(target)
        self.choices: dict[str, float | None] = {name: None for name in grid.names}  # lr factor per optimizer
        finite = np.concatenate([r.train_loss[np.isfinite(r.train_loss)] for r in grid.runs.values()] or [[1.0]])
        low = math.log10(max(float(finite.min()), 1e-4))
        high = math.log10(float(finite.max()))
        value = min(max(self.default_target, 10**low), 10**high) if math.isfinite(self.default_target) else 10**high
        style = {"description_width": "initial"}
        selected = list(grid.names) if selected is None else list(selected)
        self.lr_of = widgets.Dropdown(options=list(grid.names), value=grid.names[0], description="lr of", style=style)
        self.lr = widgets.Dropdown(options=LR_OPTIONS, value=BEST, description="lr", style=style)
        self.lr_of.observe(self._show_choice, names="value")  # before render: show that optimizer's choice first
        super().__init__({
            "optimizers": widgets.SelectMultiple(options=list(grid.names), value=tuple(selected), rows=len(grid.names),
                                                 description="optimizers", style=style,
                                                 layout=widgets.Layout(width="380px")),
            "lr_of": self.lr_of,
            "lr": self.lr,
            "x_axis": widgets.ToggleButtons(options=["steps", "seconds"], value="steps", description="x axis",
                                            style=style),
            "target": widgets.FloatLogSlider(value=value, base=10, min=low, max=high, step=0.02,
                                             description="target loss", readout_format=".3f",
                                             continuous_update=False, style=style),
        })

    def _show_choice(self, change: Any) -> None:
        choice = self.choices[change["new"]]
        self.lr.value = BEST if choice is None else choice

    def compute(self, optimizers: Sequence[str], lr_of: str, lr: float | str, x_axis: str, target: float) -> dict:
        self.choices[lr_of] = None if lr == BEST else lr
        names = list(optimizers)
        lrs = {n: None if self.choices[n] is None else self.grid.centre(n) * self.choices[n] for n in names}
        summary = summarise(self.grid, lrs=lrs, target=float(target), names=names)
        return {"summary": summary, "x_axis": x_axis, "target": float(target), "names": names,
                "choices": dict(self.choices), "default_target": self.default_target,
                "winner_steps": summary.winner("steps"), "winner_seconds": summary.winner("seconds")}

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        summary: Summary = result["summary"]
        rows = list(summary.rows.values())
        # layout in inches: title 0.55, plots 3.5, axis labels and table title 1.05, table 0.28 per line
        table_height = 0.28 * (len(rows) + 1) + 0.1
        height = 0.55 + 3.5 + 1.05 + table_height
        fig = Figure(figsize=(13, height))
        bottom = (table_height + 1.05) / height
        ax_loss = fig.add_axes((0.06, bottom, 0.53, 3.5 / height))
        ax_lr = fig.add_axes((0.67, bottom, 0.32, 3.5 / height))
        x_axis = result["x_axis"]
        for row in rows:
            color = COLORS.get(row.name)
            x, mean, low, high = row.curve(x_axis)
            label = f"{row.name}, lr {row.lr:.3g}" + ("" if row.finished == len(row.runs)
                                                       else f" ({len(row.runs) - row.finished} diverged)")
            keep = x > 0 if x_axis == "seconds" else np.ones(len(x), bool)  # log time axis: drop t = 0
            if keep.any():
                ax_loss.plot(x[keep], mean[keep], color=color, lw=1.8, label=label)
                ax_loss.fill_between(x[keep], low[keep], high[keep], color=color, alpha=0.18, lw=0)
            lrs = sorted(row.scores)
            ax_lr.plot([g / row.default for g in lrs], [row.scores[g] for g in lrs], "o-", color=color, ms=4, lw=1.2)
            if math.isfinite(row.final_loss):
                ax_lr.plot(row.lr / row.default, row.final_loss, "*", color=color, ms=13, mec="k", mew=0.6)
        ax_loss.axhline(result["target"], color="k", ls="--", lw=1, label=f"target {result['target']:.3f}")
        ax_loss.set_yscale("log")
        if x_axis == "seconds":
            ax_loss.set_xscale("log")
        ax_loss.set_xlabel("optimizer step" if x_axis == "steps" else
                           "seconds inside opt.step (wall clock, mean over seeds, log scale)")
        ax_loss.set_ylabel("training loss (cross-entropy, nats)")
        ax_loss.set_title(f"{self.grid.task.name}: mean over {len(self.grid.seeds)} seeds, band = min-max", fontsize=10)
        ax_loss.legend(fontsize=7, loc="lower left", framealpha=0.85)
        ax_loss.grid(alpha=0.3)
        finals = [s for row in rows for s in row.scores.values() if math.isfinite(s)]
        ax_lr.set_xscale("log")
        ax_lr.set_yscale("log")
        if finals:
            ax_lr.set_ylim(min(finals) * 0.8, max(finals) * 1.3)
        ax_lr.set_xlabel("lr / the optimizer's default lr")
        ax_lr.set_ylabel("median final training loss (nats)")
        ax_lr.set_title("lr sensitivity on the shared grid (colours as on the left)\n"
                        "star: the lr shown; missing points: the median seed diverged", fontsize=10)
        ax_lr.grid(alpha=0.3)
        for ax in (ax_loss, ax_lr):
            _log_tick_labels(ax)
        ax_table = fig.add_axes((0.02, 0.1 / height, 0.96, (table_height + 0.05) / height))
        ax_table.axis("off")
        metric = "test accuracy %" if summary.metric == "accuracy" else "test bits/char"
        header = ["optimizer", "lr", "steps to target", "seconds to target", metric, "step time\nx AdamW",
                  "diverged\n(whole grid)"]
        cells = []
        for r in rows:
            lr_text = f"{r.lr:.3g} = {r.lr / r.default:.3g} x default" + {
                "best from grid": " (best" + ("*" if r.best_at_edge else "") + ")",
                "grid": " (by hand)", "extra": " (extra run)"}[r.chosen]
            steps = f"{r.steps_to_target:.0f}" if math.isfinite(r.steps_to_target) else "not reached"
            secs = f"{r.seconds_to_target:.2f}" if math.isfinite(r.seconds_to_target) else "-"
            decimals = 1 if summary.metric == "accuracy" else 3
            acc = f"{r.metric_mean:.{decimals}f} ± {r.metric_std:.{decimals}f}" if r.finished else "-"
            cells.append([r.name, lr_text, f"{steps} ({r.hits}/{len(r.runs)})", secs,
                          acc + ("" if r.finished == len(r.runs) else f" ({r.finished}/{len(r.runs)})"),
                          f"{r.step_ratio:.2f}", f"{r.diverged_grid}/{r.total_grid}"])
        if cells:
            table = ax_table.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="center",
                                   colWidths=[0.22, 0.2, 0.12, 0.1, 0.14, 0.08, 0.09])
            table.auto_set_font_size(False)
            table.set_fontsize(8)
            table.scale(1, 1.35)
            for key, cell in table.get_celld().items():
                if key[0] == 0:
                    cell.set_facecolor("#e8e8e8")
                elif key[1] == 0:
                    cell.get_text().set_color(COLORS.get(rows[key[0] - 1].name, "k"))
        win_s, win_t = result["winner_steps"], result["winner_seconds"]
        ax_table.set_title(f"target {result['target']:.3f} (pre-registered rule: {result['default_target']:.3f}); "
                           f"first to target in steps: {win_s or 'none'}; in seconds: {win_t or 'none'}. "
                           "* best lr at the edge of the grid", fontsize=9)
        return fig
