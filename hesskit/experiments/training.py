"""What the training experiments of the notebooks and benchmarks share: the one training loop
(`training_steps`, with its record `StepLog`), the batch orders every optimizer sees
(`batch_order`, `random_batches`), the checkpoint plan and the run record's common readings."""

from __future__ import annotations

import itertools
import math
import operator
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import progress

__all__ = [
    "StepLog", "training_steps", "run_to_end", "batch_order", "random_batches", "iter_random_batches",
    "run_plan", "TrainingRun", "Tuning", "tune", "interleaved_step_times"
]


# --------------------------------------------------------------------------- the one training loop
@dataclass
class StepLog:
    """What `training_steps` saw, per step t = 1..steps: `loss[t-1]` (what the step returned, as a
    float; nan if it returned None or failed), `seconds[t-1]` and `cpu_seconds[t-1]` (wall-clock
    and process CPU time of the step; nan after the run stopped). `status` is "ok", "diverged"
    (a FloatingPointError, a non-finite loss or parameter, or a checkpoint that said so) or "error"
    (any other exception, when the loop was told to catch them), with `message` saying why;
    `steps_taken` counts the steps started."""

    loss: np.ndarray
    seconds: np.ndarray
    cpu_seconds: np.ndarray
    status: str = "ok"
    message: str = ""
    steps_taken: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def diverged(self) -> bool:
        return self.status != "ok"


def training_steps(step: Callable[[int], Any], steps: int, *, checkpoints: Iterable[int] = (),
                   at_checkpoint: Callable[[int], str | None] | None = None,
                   after_step: Callable[[int, float], str | None] | None = None,
                   params: Sequence[Tensor] | None = None, catch: bool = False,
                   label: str | None = "step") -> Generator[int, None, StepLog]:
    """The training loop every experiment runs, as a generator: for t = 1..steps it times
    `step(t)` (which draws batch t, builds the closure and calls `opt.step`: see
    `hesskit.optim.make_closure`), records the loss it returns, stops the run as diverged on a
    FloatingPointError (hesskit's closure check), a non-finite loss or, with `params`, a
    non-finite parameter, then calls `after_step(t, loss)` (per-step records; a returned string
    stops the run as diverged with that message) and, at the steps in `checkpoints`,
    `at_checkpoint(t)` (evaluation, untimed; same stopping rule) and yields t, so that callers can
    interleave runs (`hesskit.experiments.kfac.train_together`). Every step reports
    `progress.report(t, steps, label)` (none with `label=None`: a caller that counts the steps of
    several runs reports them itself). With `catch=True` any other exception ends the run with
    status "error" instead of propagating (a failing optimizer must not stop a comparison).
    Returns the `StepLog`; `run_to_end` runs the generator through."""
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    checkpoints = set(checkpoints)
    log = StepLog(np.full(steps, np.nan), np.full(steps, np.nan), np.full(steps, np.nan))
    for t in range(1, steps + 1):
        log.steps_taken = t
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            value = step(t)
        except FloatingPointError as err:
            log.status, log.message, value = "diverged", str(err) or f"FloatingPointError at step {t}", None
        except Exception as err:  # noqa: BLE001 (only with catch=True)
            if not catch:
                raise
            log.status, log.message, value = "error", f"{type(err).__name__}: {err}", None
        finally:
            log.seconds[t - 1] = time.perf_counter() - start
            log.cpu_seconds[t - 1] = time.process_time() - cpu_start
        loss = math.nan if value is None else float(value.detach() if isinstance(value, Tensor) else value)
        log.loss[t - 1] = loss
        if log.ok and value is not None and not math.isfinite(loss):
            log.status, log.message = "diverged", f"loss {loss} at step {t}"
        if log.ok and params is not None:
            with torch.no_grad():
                if not all(torch.isfinite(p).all() for p in params):
                    log.status, log.message = "diverged", f"a parameter is not finite after step {t}"
        if not log.ok:
            break
        for hook, args in ((after_step, (t, loss)), (at_checkpoint if t in checkpoints else None, (t,))):
            reason = hook(*args) if hook is not None else None
            if reason:
                log.status, log.message = "diverged", reason
                break
        if not log.ok:
            break
        if label is not None:
            progress.report(t, steps, label)  # shown while an explorer renders
        if t in checkpoints:
            yield t
    return log


def run_to_end(run: Generator[int, None, StepLog]) -> StepLog:
    """Run a `training_steps` generator (or any generator with a return value) through."""
    while True:
        try:
            next(run)
        except StopIteration as stop:
            return stop.value


def batch_order(num_samples: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Each step's batch indices: seeded reshuffles of the training set, epoch after epoch (the
    last incomplete batch of an epoch is dropped), so every optimizer sees the same batches."""
    if batch_size > num_samples:
        raise ValueError(f"batch_size: expected at most {num_samples} (the training set), got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    order = []
    perm, start = torch.randperm(num_samples, generator=gen), 0
    while len(order) < steps:
        if start + batch_size > num_samples:
            perm, start = torch.randperm(num_samples, generator=gen), 0
        order.append(perm[start : start + batch_size])
        start += batch_size
    return order


def iter_random_batches(num_samples: int, steps: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Each step's minibatch indices, drawn with replacement from a generator seeded by `seed`
    when the step needs them (nothing held for the steps ahead: a run's memory is its own)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(num_samples, (batch_size,), generator=gen)


def random_batches(num_samples: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """(steps, batch_size): every step's indices of `iter_random_batches`, at once. Every optimizer
    sees the same batches (the shootout's and bench/optimizers.py's sampler; `batch_order` is the
    epoch-by-epoch one)."""
    return torch.stack(list(iter_random_batches(num_samples, steps, batch_size, seed)))


def run_plan(num_samples: int, steps: int, batch_size: int, eval_every: int, seed: int) -> tuple[list, list[int]]:
    """A training run's budget, checked: each step's batch indices (`batch_order`) and the
    checkpoint steps (0, every `eval_every`, and the last)."""
    if not 1 <= batch_size <= num_samples:
        raise ValueError(f"batch_size: expected 1..{num_samples}, got {batch_size}")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps, eval_every: expected positive integers, got {steps} and {eval_every}")
    return batch_order(num_samples, steps, batch_size, seed), sorted(set(range(0, steps + 1, eval_every)) | {steps})


@dataclass
class TrainingRun:
    """One training run of an optimizer study, as every notebook and benchmark records it.

    `log` holds what each step did (`StepLog`: its loss, wall and CPU seconds, how the run
    ended); `evals[key][j]` what was measured at checkpoint `eval_steps[j]` (step 0 first), under
    keys such as "train_loss" (the loss on a fixed training set), "test_loss", "test_accuracy"
    (a fraction), "test_metric"; `per_step[key]` further per-step series ("win_rate",
    "grad_norm", "kinds", ...); `settings` every setting in effect (seed, batch size,
    hyperparameters, defaults included); `extra` anything else (parameters at the checkpoints,
    product counts, warnings). A diverged run keeps what it recorded before it stopped (nan after).
    """

    optimizer: str
    lr: float
    log: StepLog
    eval_steps: np.ndarray
    evals: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)
    per_step: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # the display name (default: the optimizer's key)

    @property
    def label(self) -> str:
        return f"{self.name or self.optimizer} (lr {self.lr:.3g})"

    @property
    def diverged(self) -> bool:
        return self.log.diverged

    @property
    def ok(self) -> bool:
        return self.log.ok

    def final(self, key: str) -> float:
        """The last checkpoint's `evals[key]`: nan if the run diverged or the value is not finite."""
        values = self.evals[key]
        if len(values) == 0:  # no checkpoint recorded (e.g. the optimizer could not be built)
            return math.nan
        value = float(values[-1])
        return value if self.ok and math.isfinite(value) else math.nan

    @property
    def final_loss(self) -> float:
        """The last checkpoint's "train_loss", inf if the run diverged: what an lr grid minimises."""
        value = self.final("train_loss")
        return value if math.isfinite(value) else math.inf

    def eval_seconds(self, clock: str = "wall") -> np.ndarray:
        """Cumulative step seconds ("wall" or "cpu" time; evaluations excluded) at each checkpoint;
        nan at checkpoints the run did not reach."""
        times = self.log.seconds if clock == "wall" else self.log.cpu_seconds
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock: expected 'wall' or 'cpu', got {clock!r}")
        cumulative = np.concatenate([[0.0], np.cumsum(np.nan_to_num(times[: self.log.steps_taken]))])
        steps = np.asarray(self.eval_steps)
        return np.where(steps < len(cumulative), cumulative[np.minimum(steps, len(cumulative) - 1)], np.nan)

    def steps_to(self, target: float, key: str = "train_loss") -> float:
        """The first checkpoint step with `evals[key]` <= target (nan if never reached)."""
        hit = np.flatnonzero(np.asarray(self.evals[key]) <= target)
        return float(self.eval_steps[hit[0]]) if len(hit) else math.nan

    def seconds_to(self, target: float, key: str = "train_loss", clock: str = "wall") -> float:
        """Step seconds until `evals[key]` first reached `target` (nan if never)."""
        hit = np.flatnonzero(np.asarray(self.evals[key]) <= target)
        return float(self.eval_seconds(clock)[hit[0]]) if len(hit) else math.nan

    def step_time(self, kind: str | None = None, statistic: str = "median", clock: str = "wall") -> float:
        """A statistic ("median", "mean", "max") of the steps' seconds ("wall" or "cpu"), over all
        steps taken or those whose `per_step["kinds"]` equals `kind`."""
        if clock not in ("cpu", "wall") or statistic not in ("median", "mean", "max"):
            raise ValueError(f"clock, statistic: expected 'cpu'/'wall' and 'median'/'mean'/'max', got {clock!r}, "
                             f"{statistic!r}")
        times = self.log.cpu_seconds if clock == "cpu" else self.log.seconds
        chosen = np.isfinite(times)
        if kind is not None:
            chosen &= np.asarray(self.per_step["kinds"]) == kind
        if not chosen.any():
            return math.nan
        return float({"median": np.median, "mean": np.mean, "max": np.max}[statistic](times[chosen]))


# --------------------------------------------------------------------------- the one learning-rate grid
@dataclass
class Tuning:
    """Optimizers trained once per learning rate of a grid, every run with the same setup (data,
    budget, initialisation, batch order, seeds: what `train_fn` binds). `grids[name]` are the
    optimizer's learning rates (sorted) and `runs[name]` its runs, in the same order; `key` is what
    the grid minimises (default: `TrainingRun.final_loss`, the last training loss, inf for a
    diverged run); `settings[name]` the extra arguments an optimizer was tuned with."""

    grids: dict[str, np.ndarray]
    runs: dict[str, list[TrainingRun]]
    train_fn: Callable[..., TrainingRun]
    key: Callable[[TrainingRun], float] = operator.attrgetter("final_loss")
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def setup(self) -> dict[str, Any]:
        """The arguments `train_fn` binds (a functools.partial's keywords; empty otherwise)."""
        return dict(getattr(self.train_fn, "keywords", {}))

    @property
    def grid(self) -> np.ndarray:
        """The one grid every optimizer was tuned on (a ValueError when the grids differ)."""
        grids = list(self.grids.values())
        if not grids or any(not np.array_equal(g, grids[0]) for g in grids[1:]):
            raise ValueError(f"grid: the optimizers were tuned on different grids, see `grids` ({sorted(self.grids)})")
        return grids[0]

    def final_losses(self, optimizer: str) -> np.ndarray:
        """What the grid minimises, `key(run)`, for each learning rate of `grids[optimizer]`."""
        return np.array([self.key(run) for run in self.runs[optimizer]])

    def best(self, optimizer: str) -> TrainingRun:
        """The run of `optimizer` with the lowest `key` (the first of equals)."""
        return min(self.runs[optimizer], key=self.key)

    def train(self, optimizer: str, lr: float, **overrides: Any) -> TrainingRun:
        """One more run with the same setup (`overrides` replace settings `train_fn` binds)."""
        return self.train_fn(optimizer, lr, **overrides)


def tune(train_fn: Callable[..., TrainingRun], grids: Mapping[str, Sequence[float]], *,
         key: Callable[[TrainingRun], float] | None = None, settings: Mapping[str, dict[str, Any]] | None = None,
         train_many: Callable[[list[tuple[str, float]]], list[TrainingRun]] | None = None) -> Tuning:
    """Train every optimizer at every learning rate of its grid (`grids`: name -> learning rates)
    with one setup: `train_fn(optimizer, lr, **settings.get(optimizer, {})) -> TrainingRun` is a
    notebook topic's `train` with its data, budget and seed bound (e.g. by functools.partial).
    Runs go optimizer by optimizer, each grid in increasing order; `train_many`, if given, trains
    the list of (optimizer, lr) pairs in that order at once instead (e.g. interleaved, as
    `hesskit.experiments.kfac.train_together`) and returns their runs in the same order.
    `key` is what the grid minimises (default: `TrainingRun.final_loss`)."""
    sorted_grids = {}
    for name, grid in grids.items():
        g = np.asarray(sorted(float(v) for v in grid))
        if len(g) == 0 or (g <= 0).any():
            raise ValueError(f"grid: expected positive learning rates for {name}, got {list(g)}")
        sorted_grids[name] = g
    settings = {name: dict(s) for name, s in (settings or {}).items()}
    configs = [(name, float(lr)) for name, g in sorted_grids.items() for lr in g]
    if train_many is not None:
        trained = iter(train_many(configs))
    else:
        trained = (train_fn(name, lr, **settings.get(name, {})) for name, lr in configs)
    runs = {name: [next(trained) for _ in g] for name, g in sorted_grids.items()}
    return Tuning(sorted_grids, runs, train_fn, **({"key": key} if key is not None else {}), settings=settings)


# --------------------------------------------------------------------------- the one step-cost loop
def interleaved_step_times(steps: Sequence[tuple[str, Callable[[Any], Any]]], batches: Iterable[Any],
                           block: int = 1, clock: str = "wall") -> tuple[list[str], np.ndarray]:
    """Time optimizers' steps in turns, so that machine load hits every optimizer alike: `steps`
    holds (label, step) pairs, `step(batch)` taking one step of one optimizer (on its own copy of
    the model) on a batch. Round r takes the next `block` batches of `batches` (drawn when the
    round starts, e.g. from `iter_random_batches`; a last incomplete block is left out), and every
    optimizer in turn takes its `block` steps on them, timed together; `clock` "wall" is
    `time.perf_counter`, "cpu" the process's CPU time (`time.process_time`), which a busy, shared
    machine inflates far less. Returns the labels and seconds[r, j], optimizer j's mean seconds
    per step in round r."""
    if block < 1:
        raise ValueError(f"block: expected a positive integer, got {block}")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock: expected 'cpu' or 'wall', got {clock!r}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    batches, rows = iter(batches), []
    while len(round_batches := list(itertools.islice(batches, block))) == block:
        row = np.zeros(len(steps))
        for j, (_, step) in enumerate(steps):
            start = now()
            for batch in round_batches:
                step(batch)
            row[j] = (now() - start) / block
        rows.append(row)
    if not rows:
        raise ValueError(f"batches: expected at least block = {block} of them, got fewer")
    return [label for label, _ in steps], np.array(rows)
