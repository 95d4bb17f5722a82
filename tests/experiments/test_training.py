"""`hesskit.experiments.training`: the one training loop and the batch orders."""

from __future__ import annotations

import math

import pytest
import torch

import numpy as np

from hesskit.experiments.training import (
    StepLog,
    TrainingRun,
    batch_order,
    interleaved_step_times,
    random_batches,
    run_to_end,
    training_steps,
    tune,
)


def losses(values):
    """A step function returning the given losses in turn."""
    return lambda t: torch.tensor(values[t - 1])


def test_steps_are_timed_recorded_and_yield_at_checkpoints():
    seen = []
    run = training_steps(losses([3.0, 2.0, 1.0, 0.5]), 4, checkpoints=[2, 4], at_checkpoint=seen.append)
    assert list(run) == [2, 4] and seen == [2, 4]
    log = run_to_end(training_steps(losses([3.0, 2.0, 1.0, 0.5]), 4))
    assert isinstance(log, StepLog) and log.ok and log.steps_taken == 4
    assert log.loss.tolist() == [3.0, 2.0, 1.0, 0.5]
    assert (log.seconds >= 0).all() and (log.cpu_seconds >= 0).all()


def test_a_non_finite_loss_stops_the_run_as_diverged():
    log = run_to_end(training_steps(losses([1.0, math.inf, 0.0]), 3))
    assert log.status == "diverged" and log.steps_taken == 2 and "step 2" in log.message
    assert math.isnan(log.loss[2]) and math.isnan(log.seconds[2])  # never started


def test_a_floating_point_error_or_a_non_finite_parameter_is_a_divergence():
    def fails(t):
        raise FloatingPointError("closure: loss is nan")

    log = run_to_end(training_steps(fails, 3))
    assert log.status == "diverged" and log.message == "closure: loss is nan" and log.steps_taken == 1
    w = torch.zeros(2)

    def blows_up(t):
        w.fill_(math.nan if t == 2 else 0.0)
        return torch.tensor(1.0)

    log = run_to_end(training_steps(blows_up, 3, params=[w]))
    assert log.status == "diverged" and "parameter" in log.message and log.steps_taken == 2


def test_hooks_can_stop_a_run_and_other_errors_propagate_unless_caught():
    log = run_to_end(training_steps(losses([1.0, 2.0, 3.0]), 3, after_step=lambda t, loss: "too high" if loss > 1.5
                                    else None))
    assert log.status == "diverged" and log.message == "too high" and log.steps_taken == 2
    log = run_to_end(training_steps(losses([1.0, 2.0, 3.0]), 3, checkpoints=[1],
                                    at_checkpoint=lambda t: "checkpoint says no"))
    assert log.message == "checkpoint says no" and log.steps_taken == 1

    def broken(t):
        raise KeyError("state")

    with pytest.raises(KeyError):
        run_to_end(training_steps(broken, 2))
    log = run_to_end(training_steps(broken, 2, catch=True))
    assert log.status == "error" and "KeyError" in log.message


def test_every_step_reports_progress(progress_to):
    calls = []
    progress_to(lambda done, total, what: calls.append((done, total, what)))
    run_to_end(training_steps(losses([1.0, 1.0]), 2, label="SGD step"))
    assert calls == [(1, 2, "SGD step"), (2, 2, "SGD step")]
    with pytest.raises(ValueError, match="steps"):
        run_to_end(training_steps(losses([1.0]), 0))


def test_batch_orders_are_seeded():
    a, b = random_batches(10, 5, 3, seed=1), random_batches(10, 5, 3, seed=1)
    assert a.shape == (5, 3) and torch.equal(a, b) and not torch.equal(a, random_batches(10, 5, 3, seed=2))
    epochs = batch_order(10, 6, 3, seed=0)  # 3 batches per epoch, the 10th sample dropped each epoch
    assert all(len(set(torch.cat(epochs[i:i + 3]).tolist())) == 9 for i in (0, 3))


def fake_run(optimizer, lr, offset=0.0):
    """A `TrainingRun` whose final training loss is (lr - 0.1)^2 + offset (inf above lr 1: diverged)."""
    log = StepLog(np.zeros(1), np.zeros(1), np.zeros(1), status="ok" if lr <= 1 else "diverged")
    return TrainingRun(optimizer, lr, log, np.array([0, 1]), {"train_loss": np.array([1.0, (lr - 0.1) ** 2 + offset])},
                       settings={"offset": offset})


def test_tune_trains_every_grid_in_order_and_picks_by_key():
    calls = []

    def train_fn(optimizer, lr, **overrides):
        calls.append((optimizer, lr, overrides))
        return fake_run(optimizer, lr, **overrides)

    tuning = tune(train_fn, {"a": [3.0, 0.1, 0.3], "b": [0.3]}, settings={"b": {"offset": 1.0}})
    assert calls == [("a", 0.1, {}), ("a", 0.3, {}), ("a", 3.0, {}), ("b", 0.3, {"offset": 1.0})]
    assert tuning.grids["a"].tolist() == [0.1, 0.3, 3.0] and [r.lr for r in tuning.runs["a"]] == [0.1, 0.3, 3.0]
    assert tuning.best("a").lr == 0.1 and tuning.final_losses("a")[-1] == math.inf  # diverged: inf
    with pytest.raises(ValueError, match="grid"):
        tuning.grid  # noqa: B018 (the grids differ)
    assert tuning.train("a", 0.2, offset=2.0).settings == {"offset": 2.0}
    by_lr = tune(train_fn, {"a": [0.1, 0.3]}, key=lambda r: -r.lr)
    assert by_lr.best("a").lr == 0.3 and by_lr.grid.tolist() == [0.1, 0.3]
    together = tune(train_fn, {"a": [0.3, 0.1]}, train_many=lambda configs: [fake_run(n, lr) for n, lr in configs])
    assert [r.lr for r in together.runs["a"]] == [0.1, 0.3]
    with pytest.raises(ValueError, match="grid"):
        tune(train_fn, {"a": [0.0]})


def test_interleaved_step_times_take_turns_in_blocks():
    order = []
    steps = [(name, lambda batch, name=name: order.append((name, batch))) for name in ("x", "y")]
    labels, seconds = interleaved_step_times(steps, list(range(6)), block=2)
    assert labels == ["x", "y"] and seconds.shape == (3, 2) and (seconds >= 0).all()
    assert order[:6] == [("x", 0), ("x", 1), ("y", 0), ("y", 1), ("x", 2), ("x", 3)]
    assert interleaved_step_times(steps, [0, 1], clock="cpu")[1].shape == (2, 2)
    with pytest.raises(ValueError, match="clock"):
        interleaved_step_times(steps, [0], clock="gpu")
    with pytest.raises(ValueError, match="block"):
        interleaved_step_times(steps, [0], block=0)
    with pytest.raises(ValueError, match="batches"):
        interleaved_step_times(steps, [0], block=2)
    assert interleaved_step_times(steps, iter(range(5)), block=2)[1].shape == (2, 2)  # the last batch left out


def test_training_run_readings():
    log = StepLog(np.array([3.0, 2.0, 1.0, np.nan]), np.array([0.1, 0.2, 0.3, np.nan]),
                  np.array([0.05, 0.1, 0.1, np.nan]), steps_taken=3)
    evals = {"train_loss": np.array([4.0, 2.5, 0.9]), "test_accuracy": np.array([0.1, 0.5, 0.8])}
    run = TrainingRun("sgd", 0.1, log, np.array([0, 2, 3]), evals, per_step={"kinds": np.array(["a", "b", "a", "a"])},
                      name="SGD")
    assert run.label == "SGD (lr 0.1)" and run.ok and not run.diverged
    assert run.final_loss == 0.9 and run.final("test_accuracy") == 0.8
    np.testing.assert_allclose(run.eval_seconds(), [0.0, 0.3, 0.6])
    np.testing.assert_allclose(run.eval_seconds("cpu"), [0.0, 0.15, 0.25])
    assert run.steps_to(2.5) == 2 and math.isnan(run.steps_to(0.5))
    assert run.seconds_to(1.0) == pytest.approx(0.6) and run.seconds_to(1.0, clock="cpu") == pytest.approx(0.25)
    assert run.step_time() == pytest.approx(0.2) and run.step_time("a", "max") == pytest.approx(0.3)
    assert run.step_time("b", clock="cpu") == pytest.approx(0.1) and math.isnan(run.step_time("c"))
    diverged = TrainingRun("sgd", 9.0, StepLog(np.full(2, np.nan), np.zeros(2), np.zeros(2), status="diverged",
                                               steps_taken=1), np.array([0, 1]), {"train_loss": np.array([4.0, 1.0])})
    assert diverged.final_loss == math.inf and math.isnan(diverged.final("train_loss"))
    unbuilt = TrainingRun("x", 1.0, StepLog(np.zeros(0), np.zeros(0), np.zeros(0), status="error"), np.zeros(0, int),
                          {"train_loss": np.zeros(0)})
    assert unbuilt.final_loss == math.inf  # no checkpoint at all (an optimizer that could not be built)
    with pytest.raises(ValueError, match="clock"):
        run.eval_seconds("gpu")
