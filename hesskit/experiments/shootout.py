"""Notebook 10 (`10_optimizer_shootout.ipynb`) and `bench/optimizers.py`: the optimizer shootout,
a fair comparison protocol and its harness.

Comparisons of optimizers go wrong in a few well-documented ways: unequal tuning budgets, weak
baselines, one seed, steps instead of seconds, and a target chosen after the results are in
(Schmidt, Schneider & Hennig, "Descending through a crowded valley: benchmarking deep learning
optimizers", ICML 2021; Dahl et al., "Benchmarking neural network training algorithms", 2023,
the AlgoPerf benchmark; Kaddour, Key, Nawrot, Minervini & Kusner, "No train no gain: revisiting
efficient training algorithms for transformer-based language models", NeurIPS 2023). This module
is a small harness that makes the fair protocol the easy path, for the notebook (small models and
budgets) and the benchmark (larger ones) alike:

* `REGISTRY`: name -> `Entry` (how to build the optimizer, which closure it needs, the centre of
  its lr grid, its per-step time target); `BENCH_ONLY`: the entries only the benchmark measures,
  and `BENCH_REGISTRY`, the benchmark's registry (the notebook's with those added). `LR_FACTORS`,
  `PILOT_FACTORS`, `TARGET_FRACTION` (with `target_step`): the grid and the target rule.
* the two tasks are `hesskit.experiments.tasks.digits_task` (a few-channel `SmallCNN` on the
  scikit-learn digits) and `tasks.char_lm_task` (a tiny `CharTransformerLM` on `hk.data.text`), each
  a `tasks.Task` (`Task.to` moves one to a device; `Task.score` is the (loss, metric) a run records).
* `train_run`: one (optimizer, lr, seed) run through `training.training_steps`, on the
  minibatches every optimizer shares (`training.random_batches`), as a `training.TrainingRun`
  (`run_to_record` / `run_from_record`: the benchmark's JSON records; `total_seconds`: its
  reading here); `run_grid`: every optimizer x lr x seed, on the same
  initialisations and batch orders, each optimizer's grid optionally located by a coarse pilot
  that is the same for everyone (coarse-to-fine search: equal budgets, no hand-picked learning
  rates); `Grid`: the runs and the protocol that produced them.
* `summarise`: a pure function of the stored runs (`Summary`, one `Row` per optimizer): best lr
  by median final training loss (`best_lr`), steps and seconds to a target loss (`target_loss`,
  `reach`, `loss_at`), test metric with its spread over seeds, per-step time relative to AdamW,
  divergence counts.

The notebook's explorer, `hesskit.widgets.shootout.ShootoutExplorer`, only re-summarises and
re-plots a `Grid` (and trains extra runs only for learning rates between the grid points).
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
import warnings
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from ..optim import KFAC, MFAC, MKOR, AdaHessian, NewtonCG, Sophia
from ..optim.closures import CLOSURES, make_closure
from .tasks import Task
from .training import StepLog, TrainingRun, iter_random_batches, run_to_end, training_steps

__all__ = [
    "BENCH_ONLY",
    "BENCH_REGISTRY",
    "Entry",
    "Grid",
    "LR_FACTORS",
    "PILOT_FACTORS",
    "REFERENCE",
    "REGISTRY",
    "Row",
    "Summary",
    "TARGET_FRACTION",
    "best_lr",
    "entry",
    "loss_at",
    "reach",
    "run_from_record",
    "run_grid",
    "run_to_record",
    "summarise",
    "target_loss",
    "target_step",
    "total_seconds",
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
    of the lr grid: the constructor's default lr unless given. `max_step_ratio`: the benchmark's
    target for its mean (amortised) step time relative to AdamW's (None: no target).
    """

    cls: type
    kwargs: dict = field(default_factory=dict)
    closure: str = "loss"
    takes_model: bool = False  # K-FAC and MKOR take the model (hooks on its layers), the others its parameters
    centre: float = 1e-3
    max_step_ratio: float | None = None

    def make(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The factory: a fresh optimizer for `model` with learning rate `lr`."""
        return self.cls(model if self.takes_model else model.parameters(), lr=lr, **self.kwargs)

    def grid(self, factors: Sequence[float] = LR_FACTORS) -> list[float]:
        """The learning rates tried: `centre` times each factor."""
        return [self.centre * f for f in factors]

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__module__.split('.')[0]}.{self.cls.__name__}({args})"


def entry(cls: type, closure: str = "loss", takes_model: bool = False, lr: float | None = None,
          max_step_ratio: float | None = None, **kwargs: Any) -> Entry:
    """A registry entry for `cls` (`kwargs`: its fixed settings); `lr=None` centres the grid on the
    constructor's default lr."""
    if closure not in CLOSURES:
        raise ValueError(f"closure: expected one of {CLOSURES}, got {closure!r}")
    centre = inspect.signature(cls).parameters["lr"].default if lr is None else lr
    if isinstance(centre, bool) or not isinstance(centre, (int, float)) or not centre > 0:
        raise ValueError(f"{cls.__name__} has no usable default lr ({centre!r}): pass lr=")
    return Entry(cls, dict(kwargs), closure, takes_model, float(centre), max_step_ratio)


# The optimizers of notebook 10 and bench/optimizers.py: every setting at its default but SGD's lr grid centre
# (torch's default 1e-3 is a placeholder) and Newton-CG's CG iterations (10 instead of 100 per step).
REGISTRY: dict[str, Entry] = {
    "SGD (momentum 0.9)": entry(torch.optim.SGD, "backward", lr=0.1, momentum=0.9),
    "AdamW": entry(torch.optim.AdamW, "backward"),
    "AdaHessian": entry(AdaHessian, max_step_ratio=3.0),
    "Sophia-H (Hutchinson, k=10)": entry(Sophia, max_step_ratio=1.3, estimator="hutchinson"),
    "Sophia-G (GNB, k=10)": entry(Sophia, "loss_outputs", max_step_ratio=1.3, estimator="gnb"),
    "K-FAC (f=10, i=100)": entry(KFAC, takes_model=True, max_step_ratio=2.0),
    "MKOR": entry(MKOR, takes_model=True, max_step_ratio=2.0),
    "M-FAC (m=32)": entry(MFAC, max_step_ratio=2.0, num_grads=32),
    "Newton-CG (GGN, 10 CG iters)": entry(NewtonCG, "loss_outputs", curvature="ggn", max_cg_iters=10),
}

# Entries measured by bench/optimizers.py only: AdaHessian with D refreshed every 2 steps (davda54's `update_each`),
# the delayed refresh that brings its step cost near a first-order step's (notebook 06 covers it).
BENCH_ONLY: dict[str, Entry] = {
    "AdaHessian (D every 2 steps)": entry(AdaHessian, max_step_ratio=3.0, update_every=2),
}


def _insert_after(registry: dict[str, Entry], anchor: str, extra: dict[str, Entry]) -> dict[str, Entry]:
    items = list(registry.items())
    at = list(registry).index(anchor) + 1
    return dict(items[:at] + list(extra.items()) + items[at:])


# The benchmark's registry: REGISTRY with BENCH_ONLY's AdaHessian variant next to AdaHessian.
BENCH_REGISTRY: dict[str, Entry] = _insert_after(REGISTRY, "AdaHessian", BENCH_ONLY)


# --------------------------------------------------------------------------- one run
def _at_end(num_points: int, value: float) -> np.ndarray:
    """A per-checkpoint array holding `value` at the last of `num_points` checkpoints, nan at the others (what is
    measured once, at the end of a run); empty when nothing was recorded."""
    return np.array([math.nan] * (num_points - 1) + [value]) if num_points else np.zeros(0)


def _last(run: TrainingRun, key: str) -> float:
    """`run.evals[key]` at the last checkpoint, as recorded (nan if nothing was)."""
    return float(run.evals[key][-1]) if len(run.eval_steps) else math.nan


def total_seconds(run: TrainingRun) -> float:
    """Seconds inside `opt.step` over every step the run took (evaluation excluded)."""
    return float(run.log.seconds[: run.log.steps_taken].sum())


def run_to_record(run: TrainingRun) -> dict:
    """A `train_run` run as plain JSON values (bench/optimizers.py's records): optimizer, lr, seed, status, message,
    curve (a list of (step, training loss, seconds inside `opt.step` so far)), test_loss, metric (the test
    metric), steps_taken, total_seconds."""
    curve = [(int(s), float(loss), float(t))
             for s, loss, t in zip(run.eval_steps, run.evals["train_loss"], run.eval_seconds())]
    return {"optimizer": run.optimizer, "lr": float(run.lr), "seed": int(run.settings["seed"]),
            "status": run.log.status, "message": run.log.message, "curve": curve, "test_loss": _last(run, "test_loss"),
            "metric": _last(run, "test_metric"), "steps_taken": int(run.log.steps_taken),
            "total_seconds": total_seconds(run)}


def run_from_record(record: dict) -> TrainingRun:
    """The run `run_to_record` wrote. Records without steps_taken / total_seconds (older benchmark files) take them
    from the last recorded point. A record keeps no per-step times: the log's seconds are spread evenly between
    the recorded points (and on to steps_taken), so that the seconds at the points (`eval_seconds`) and the mean
    step time are the record's, up to rounding; the log's per-step losses are nan."""
    arr = np.array(record["curve"], dtype=float).reshape(-1, 3)
    last_step, last_seconds = (int(arr[-1, 0]), float(arr[-1, 2])) if len(arr) else (0, 0.0)
    taken = int(record.get("steps_taken", last_step))
    steps = arr[:, 0].astype(int)
    seconds = _spread_seconds(steps, arr[:, 2], taken, float(record.get("total_seconds", last_seconds)))
    log = StepLog(np.full(taken, math.nan), seconds, np.full(taken, math.nan), record["status"],
                  record.get("message", ""), taken)
    evals = {"train_loss": arr[:, 1], "test_loss": _at_end(len(arr), float(record.get("test_loss", math.nan))),
             "test_metric": _at_end(len(arr), float(record.get("metric", math.nan)))}
    return TrainingRun(record["optimizer"], float(record["lr"]), log, steps, evals,
                       settings={"seed": int(record["seed"])}, extra={"warnings": ()})


def _spread_seconds(steps: np.ndarray, seconds: np.ndarray, taken: int, total: float) -> np.ndarray:
    """Per-step seconds of `taken` steps whose cumulative sums are `seconds` at `steps` and `total` at the end:
    each stretch's seconds spread evenly over its steps."""
    per_step = np.full(taken, math.nan)
    marks = [(0, 0.0)] + [(int(s), float(c)) for s, c in zip(steps, seconds) if 0 < s <= taken] + [(taken, total)]
    for (a, at_a), (b, at_b) in zip(marks, marks[1:]):
        if b > a:
            per_step[a:b] = (at_b - at_a) / (b - a)
    return per_step


def train_run(task: Task, name: str, lr: float, seed: int, steps: int, batch_size: int,
              record_every: int | None = 10, registry: dict[str, Entry] | None = None) -> TrainingRun:
    """Train `task.model(seed)` with `registry[name].make(model, lr)` for `steps` steps on the
    batches `training.iter_random_batches(len(task.train[0]), steps, batch_size, seed)`; record the
    training loss every `record_every` steps (None: no evaluation at all, neither the training loss
    nor the test set: for measuring memory or warnings). The steps run in `training.training_steps`.

    Returns a `training.TrainingRun`: `eval_steps` the recorded steps (step 0 first), `evals`
    "train_loss" there and, at the last one of a finished run, "test_loss" and "test_metric" (the
    task's metric: accuracy in % or bits per character; nan at the other checkpoints), `settings`
    the entry's fixed settings, the seed and the budget. Divergence (the notebook's and the
    benchmark's rule): a FloatingPointError from hesskit's closure check, a non-finite loss, or a
    final training loss above the initial one. Any other exception ends the run with status
    "error" (it counts as diverged when tuning). Warnings (e.g. K-FAC's fallback layers) are
    collected in `extra["warnings"]`, not shown."""
    registry = REGISTRY if registry is None else registry
    if steps < 1 or batch_size < 1 or (record_every is not None and record_every < 1):
        raise ValueError(f"steps, batch_size, record_every: expected positive integers, got {steps}, {batch_size}, "
                         f"{record_every}")
    spec = registry[name]
    points: list[tuple[int, float]] = []  # (step, training loss) at the recorded steps
    log = StepLog(np.full(steps, np.nan), np.full(steps, np.nan), np.full(steps, np.nan))  # no step taken yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = task.model(seed)
        try:
            opt = spec.make(model, lr)
            order = iter_random_batches(len(task.train[0]), steps, batch_size, seed)  # drawn step by step
            log = run_to_end(_run_steps(task, spec, model, opt, order, steps, record_every, points,
                                        label=f"{name}, lr {lr:.3g}, seed {seed}: step"))
        except Exception as err:  # noqa: BLE001 (one failing optimizer must not stop the shootout)
            log.status, log.message = "error", f"{type(err).__name__}: {err}"
    if log.ok and points and not points[-1][1] <= points[0][1]:  # nan, or above the start: blown up
        log.status, log.message = "diverged", f"final training loss {points[-1][1]:.4g} > initial {points[0][1]:.4g}"
    evaluated = log.ok and record_every is not None
    test_loss, metric = task.score(model, task.test) if evaluated else (math.nan, math.nan)
    evals = {"train_loss": np.array([loss for _, loss in points], dtype=float),
             "test_loss": _at_end(len(points), test_loss), "test_metric": _at_end(len(points), metric)}
    settings = {**spec.kwargs, "seed": int(seed), "steps": steps, "batch_size": batch_size,
                "record_every": record_every}
    return TrainingRun(name, float(lr), log, np.array([s for s, _ in points], dtype=int), evals, settings,
                       extra={"warnings": tuple(sorted({str(w.message).splitlines()[0] for w in caught}))})


def _run_steps(task: Task, spec: Entry, model: nn.Module, opt: torch.optim.Optimizer, order: Iterator[Tensor],
               steps: int, record_every: int | None, points: list[tuple[int, float]], label: str
               ) -> Generator[int, None, StepLog]:
    """`train_run`'s `training_steps` generator: step t is one `opt.step` on the t-th batch of `order`
    (gathered before the step's clock starts; the GPU synchronised before it stops; any exception
    but a FloatingPointError ends the run as an "error"); the training loss is appended to `points`
    at step 0 and every `record_every` steps (and the last)."""
    x, y = task.train
    batch: list[Tensor] = []

    def gather(t: int, loss: float = math.nan) -> None:  # after step t, untimed: batch t + 1
        if t < steps:
            idx = next(order).to(task.device)
            batch[:] = x[idx], y[idx]

    def step(t: int) -> Tensor | None:
        xb, yb = batch
        try:
            return opt.step(make_closure(spec.closure, opt, lambda: task.loss(model(xb), yb)))
        finally:
            if task.device.type == "cuda":
                torch.cuda.synchronize()

    def record(t: int) -> None:
        current = task.score(model, task.train_eval)[0]
        points.append((t, current if math.isfinite(current) else math.nan))

    checkpoints = []
    if record_every is not None:
        checkpoints = [t for t in range(1, steps + 1) if t % record_every == 0 or t == steps]
        record(0)
    gather(0)
    return training_steps(step, steps, checkpoints=checkpoints, at_checkpoint=record, after_step=gather, catch=True,
                          label=label)


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
    runs: dict[tuple[str, float, int], TrainingRun]
    pilot: dict[tuple[str, float], TrainingRun] = field(default_factory=dict)
    pilot_steps: int = 0
    extra: dict[tuple[str, float, int], TrainingRun] = field(default_factory=dict)
    wall_seconds: float = math.nan

    def lrs(self, name: str) -> list[float]:
        return [self.centres[name] * f for f in self.factors]

    def centre(self, name: str) -> float:
        return self.centres[name]

    def default(self, name: str) -> float:
        """The optimizer's own default lr (the registry's centre)."""
        return self.registry[name].centre

    def train(self, name: str, lr: float, seed: int) -> TrainingRun:
        """One more run under exactly this grid's protocol."""
        return train_run(self.task, name, lr, seed, self.steps, self.batch_size, self.record_every, self.registry)

    def runs_at(self, name: str, lr: float) -> list[TrainingRun]:
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
    pilot: dict[tuple[str, float], TrainingRun] = {}
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
def reach(run: TrainingRun, target: float) -> tuple[float, float]:
    """(steps, seconds) at the first recorded point with training loss <= target; (inf, inf) if never
    (`TrainingRun.steps_to` and `seconds_to`, which say nan)."""
    step = run.steps_to(target)
    return (math.inf, math.inf) if math.isnan(step) else (step, run.seconds_to(target))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if len(values) else math.inf


def loss_at(run: TrainingRun, step: int) -> float:
    """The training loss at the first recorded step >= `step` (inf if the run did not get there)."""
    if not run.ok:
        return math.inf
    return next((float(loss) for s, loss in zip(run.eval_steps, run.evals["train_loss"]) if s >= step), math.inf)


def best_lr(grid: Grid, name: str) -> tuple[float, dict[float, float]]:
    """The grid lr with the lowest median (over seeds) final training loss, and every lr's score.
    Diverged runs count as inf; ties go to the smaller lr."""
    scores = {lr: _median([grid.runs[(name, lr, s)].final_loss for s in grid.seeds]) for lr in grid.lrs(name)}
    return min(scores, key=lambda lr: (scores[lr], lr)), scores


def target_step(steps: int, fraction: float = TARGET_FRACTION) -> int:
    """The step at which the target is read off: `fraction` of a budget of `steps` steps."""
    return round(fraction * steps)


def target_loss(grid: Grid, fraction: float = TARGET_FRACTION, reference: str = REFERENCE) -> float:
    """The rule fixed before looking at any result: the reference optimizer's (AdamW's) median
    training loss, at its best lr, after `fraction` of the step budget (`target_step`)."""
    if reference not in grid.names:
        raise ValueError(f"reference: {reference!r} is not in the grid; pass target= explicitly")
    lr, _ = best_lr(grid, reference)
    step = target_step(grid.steps, fraction)
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
    runs: list[TrainingRun]
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
        n = min(len(r.eval_steps) for r in ok)
        losses = np.array([r.evals["train_loss"][:n] for r in ok])
        x = (ok[0].eval_steps[:n].astype(float) if axis == "steps"
             else np.mean([r.eval_seconds()[:n] for r in ok], axis=0))
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
        f"{reference}'s median training loss at step {target_step(grid.steps)} of {grid.steps}"
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
        metrics = [r.final("test_metric") for r in ok]
        grid_runs = [grid.runs[(name, g, s)] for g in grid.lrs(name) for s in grid.seeds]
        rows[name] = Row(
            name=name, lr=lr, best_lr=best, centre=grid.centre(name), default=grid.default(name), chosen=kind,
            best_at_edge=best in (grid.lrs(name)[0], grid.lrs(name)[-1]), scores=scores, runs=runs,
            final_loss=_median([r.final_loss for r in runs]),
            steps_to_target=_median([a for a, _ in reached]), seconds_to_target=_median([b for _, b in reached]),
            hits=sum(math.isfinite(a) for a, _ in reached),
            metric_mean=float(np.mean(metrics)) if metrics else math.nan,
            metric_std=float(np.std(metrics, ddof=1)) if len(metrics) > 1 else (0.0 if metrics else math.nan),
            finished=len(ok), step_ratio=math.nan,
            step_time=_median([r.step_time(statistic="mean") for r in grid_runs if r.log.steps_taken]),
            diverged_grid=sum(not r.ok for r in grid_runs), total_grid=len(grid_runs),
            errors=[f"lr {r.lr:.3g}, seed {r.settings['seed']}: {r.log.message}" for r in grid_runs
                    if r.log.status == "error"],
        )
    ref_time = rows[reference].step_time if reference in rows else math.nan
    for row in rows.values():
        row.step_ratio = row.step_time / ref_time if ref_time > 0 else math.nan
    rows = {name: rows[name] for name in names}
    return Summary(rows, target, rule, grid.task.metric, reference)

