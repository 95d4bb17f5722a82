import matplotlib

matplotlib.use("Agg")

# Notebook 10's protocol and harness (hesskit.experiments.shootout), and bench/optimizers.py's use of
# it. The explorer: tests/widgets/test_shootout_explorer.py.

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hesskit.experiments.tasks import char_lm_task  # noqa: E402
from hesskit.experiments.shootout import (  # noqa: E402
    BENCH_ONLY,
    BENCH_REGISTRY,
    LR_FACTORS,
    PILOT_FACTORS,
    REGISTRY,
    TARGET_FRACTION,
    Grid,
    entry,
    reach,
    run_from_record,
    run_grid,
    run_to_record,
    summarise,
    target_loss,
    target_step,
    total_seconds,
    train_run,
)
from hesskit.experiments.training import StepLog, TrainingRun, random_batches  # noqa: E402
from fixtures.shootout import BATCH, EVERY, FACTORS, SEEDS, STEPS, task  # noqa: E402,F401 (pytest fixtures)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grid(task):
    """Every registry optimizer, 3 lrs x 2 seeds x 6 steps, after a 3-point pilot of 3 steps."""
    return run_grid(task, seeds=SEEDS, steps=STEPS, batch_size=BATCH, record_every=EVERY, factors=FACTORS,
                    pilot_factors=(1 / 9, 1.0, 9.0), pilot_steps=3)


# --------------------------------------------------------------------------- the registry
def test_registry_agrees_with_the_benchmark():
    path = ROOT / "bench" / "optimizers.py"
    spec = importlib.util.spec_from_file_location("bench_optimizers", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_optimizers"] = bench  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_optimizers"]
    # one protocol: the benchmark defines no registry, grid, target rule, run or summary of its own
    assert bench.LR_FACTORS is LR_FACTORS and bench.target_step is target_step
    assert target_step(300) == round(TARGET_FRACTION * 300) == 180
    assert bench.train_run is train_run and bench.summarise is summarise and bench.Grid is Grid
    assert bench.BENCH_REGISTRY is BENCH_REGISTRY
    assert [name for name in bench.BENCH_REGISTRY if name not in BENCH_ONLY] == list(REGISTRY)
    assert list(BENCH_REGISTRY)[3] == "AdaHessian (D every 2 steps)"  # the variant next to AdaHessian, as ever
    assert BENCH_ONLY["AdaHessian (D every 2 steps)"].kwargs == {"update_every": 2}
    for name, theirs in bench.BENCH_REGISTRY.items():
        if name in BENCH_ONLY:
            continue
        ours = REGISTRY[name]
        assert ours is theirs, name
        assert ours.grid() == pytest.approx([ours.centre * f for f in LR_FACTORS]), name


def test_entry_resolves_the_default_lr_and_checks_the_closure():
    e = entry(torch.optim.AdamW, "backward")
    assert e.centre == 1e-3 and e.grid((1.0, 3.0)) == pytest.approx([1e-3, 3e-3])
    assert entry(torch.optim.SGD, "backward", lr=0.1).centre == 0.1
    with pytest.raises(ValueError, match="closure"):
        entry(torch.optim.AdamW, "nonsense")
    model = torch.nn.Linear(2, 2)
    assert REGISTRY["K-FAC (f=10, i=100)"].make(model, 0.05).param_groups[0]["lr"] == 0.05
    assert "Sophia" in REGISTRY["Sophia-G (GNB, k=10)"].describe()


# --------------------------------------------------------------------------- the protocol
def test_a_run_is_the_plain_loop_on_the_shared_batches(task):
    """train_run (training.training_steps on training.random_batches) is the notebook's plain loop:
    minibatches drawn step by step from a generator seeded by the seed, the loss recorded every EVERY steps."""
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(random_batches(100, 2, 8, 3), torch.stack([torch.randint(100, (8,), generator=gen)
                                                                  for _ in range(2)]))
    run = train_run(task, "AdamW", 3e-3, 1, STEPS, BATCH, EVERY)
    model = task.model(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    (x, y), gen = task.train, torch.Generator().manual_seed(1)
    losses = [task.score(model, task.train_eval)[0]]
    for t in range(1, STEPS + 1):
        idx = torch.randint(len(x), (BATCH,), generator=gen)
        opt.zero_grad()
        task.loss(model(x[idx]), y[idx])[0].backward()
        opt.step()
        if t % EVERY == 0:
            losses.append(task.score(model, task.train_eval)[0])
    assert run.evals["train_loss"].tolist() == losses and list(run.eval_steps) == [0, 2, 4, 6]
    assert run.final("test_loss") == task.score(model, task.test)[0]


def test_every_optimizer_starts_from_the_same_weights_and_records_the_same_points(grid):
    for seed in SEEDS:
        starts = {r.evals["train_loss"][0] for (n, lr, s), r in grid.runs.items() if s == seed}
        assert len(starts) == 1  # same initialisation for every optimizer and lr
    for run in grid.runs.values():
        assert run.log.status in ("ok", "diverged"), run.log.message  # no optimizer errors on a CNN
        if run.ok:
            assert list(run.eval_steps) == [0, 2, 4, 6] and run.log.steps_taken == STEPS
            seconds = run.eval_seconds()
            assert np.all(np.diff(seconds) >= 0) and total_seconds(run) >= seconds[-1]
            assert run.final_loss <= run.evals["train_loss"][0]
            assert 0 <= run.final("test_metric") <= 100


def test_runs_are_deterministic_and_the_harness_is_reused_for_extra_runs(task, grid):
    lr = grid.lrs("AdamW")[1]
    again = grid.train("AdamW", lr, 1)
    np.testing.assert_array_equal(again.evals["train_loss"], grid.runs[("AdamW", lr, 1)].evals["train_loss"])
    assert again.final("test_metric") == grid.runs[("AdamW", lr, 1)].final("test_metric")


def test_divergence_and_errors_are_counted_not_hidden(task):
    run = train_run(task, "SGD (momentum 0.9)", 1e4, 0, STEPS, BATCH, EVERY)
    assert run.log.status == "diverged" and run.final_loss == math.inf and np.isnan(run.evals["test_metric"]).all()

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("broken on purpose")

    registry = {"broken": entry(Broken, "backward", lr=0.1)}
    run = train_run(task, "broken", 0.1, 0, STEPS, BATCH, EVERY, registry=registry)
    assert run.log.status == "error" and "broken on purpose" in run.log.message and run.final_loss == math.inf
    assert run.log.message == "RuntimeError: broken on purpose" and run.log.steps_taken == 1
    assert list(run.eval_steps) == [0]

    class Unbuildable(torch.optim.SGD):
        def __init__(self, params, lr=0.1):
            raise ValueError("cannot build")

    run = train_run(task, "unbuildable", 0.1, 0, STEPS, BATCH, EVERY,
                    registry={"unbuildable": entry(Unbuildable, "backward")})
    assert run.log.status == "error" and run.log.message == "ValueError: cannot build" and run.log.steps_taken == 0
    assert len(run.eval_steps) == 0 and math.isnan(run.step_time(statistic="mean")) and run.final_loss == math.inf


def test_a_floating_point_error_at_the_first_step_is_a_divergence(task):
    class Exploding(torch.optim.SGD):
        def step(self, closure=None):
            raise FloatingPointError("closure: the loss is nan")

    registry = {"exploding": entry(Exploding, "backward", lr=0.1)}
    run = train_run(task, "exploding", 0.1, 0, STEPS, BATCH, EVERY, registry=registry)
    assert run.log.status == "diverged" and run.log.message == "closure: the loss is nan" and run.log.steps_taken == 1
    assert list(run.eval_steps) == [0] and run.final_loss == math.inf


def test_a_run_without_records_evaluates_nothing(task):
    """record_every=None (the benchmark's memory and warning runs): the same steps, no evaluation."""
    run = train_run(task, "K-FAC (f=10, i=100)", 0.1, 0, STEPS, BATCH, None)
    assert run.ok and run.log.steps_taken == STEPS and len(run.eval_steps) == len(run.evals["train_loss"]) == 0
    assert len(run.evals["test_loss"]) == len(run.evals["test_metric"]) == 0 and total_seconds(run) > 0
    recorded = train_run(task, "K-FAC (f=10, i=100)", 0.1, 0, STEPS, BATCH, EVERY)
    assert recorded.extra["warnings"] == run.extra["warnings"]


def test_run_records_round_trip(task):
    run = train_run(task, "AdamW", 3e-3, 1, STEPS, BATCH, EVERY)
    record = json.loads(json.dumps(run_to_record(run)))
    back = run_from_record(record)
    assert (back.optimizer, back.lr, back.settings["seed"]) == ("AdamW", 3e-3, 1)
    np.testing.assert_array_equal(back.eval_steps, run.eval_steps)
    np.testing.assert_array_equal(back.evals["train_loss"], run.evals["train_loss"])
    # a record keeps the seconds at the recorded points, not those of every step: equal up to rounding
    np.testing.assert_allclose(back.eval_seconds(), run.eval_seconds(), rtol=1e-12)
    assert (back.log.status, back.final("test_metric"), back.final("test_loss"), back.log.steps_taken) == (
        run.log.status, run.final("test_metric"), run.final("test_loss"), run.log.steps_taken)
    assert total_seconds(back) == pytest.approx(total_seconds(run), rel=1e-12) and back.final_loss == run.final_loss
    assert back.step_time(statistic="mean") == pytest.approx(run.step_time(statistic="mean"), rel=1e-12)
    old = {key: record[key] for key in ("optimizer", "lr", "seed", "status", "curve", "test_loss", "metric")}
    assert run_from_record(old).log.steps_taken == STEPS  # an older benchmark file
    saved = {"task": "digits", "optimizer": "AdamW", "lr": 0.001, "seed": 2, "status": "ok",  # as the README's file
             "curve": [[0, 2.3, 0.0], [10, 2.2, 0.03], [20, 2.1, 0.057]], "test_loss": 0.2, "metric": 91.5}
    loaded = run_from_record(saved)
    assert loaded.log.steps_taken == 20 and loaded.final_loss == 2.1 and loaded.final("test_metric") == 91.5
    np.testing.assert_allclose(loaded.eval_seconds(), [0.0, 0.03, 0.057], rtol=1e-12)


def test_tasks_move_and_count_accuracy_in_the_dtype_asked(task):
    moved = task.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.train[0], task.train[0])
    model = task.model(0)
    loss64, acc64 = task.score(model, task.test)
    loss32, acc32 = replace(task, accuracy_dtype=torch.float32).score(model, task.test)
    assert loss32 == loss64 and acc32 == pytest.approx(acc64, rel=1e-6)


def test_pilot_gives_every_optimizer_the_same_budget_and_centres_the_grid(grid):
    budgets = set(grid.num_runs().values())
    assert budgets == {(3, len(FACTORS) * len(SEEDS))}
    for name in grid.names:
        pilot = {lr: r.final_loss for (n, lr), r in grid.pilot.items() if n == name}
        best = min(pilot, key=lambda lr: (pilot[lr], lr))
        assert grid.centre(name) == best
        assert grid.lrs(name) == pytest.approx([best * f for f in FACTORS])
        assert any(math.isclose(best / grid.default(name), f) for f in (1 / 9, 1.0, 9.0))


# --------------------------------------------------------------------------- the summary, on runs with known answers
def fake_run(name, lr, seed, rate, steps=100, every=10, status="ok", metric=90.0, step_time=0.01):
    """Training loss 2 exp(-rate t), recorded every `every` steps, `step_time` seconds per step."""
    t = np.arange(0, steps + 1, every)
    log = StepLog(np.full(steps, np.nan), np.full(steps, step_time), np.full(steps, np.nan), status, steps_taken=steps)
    at_end = np.full(len(t) - 1, np.nan)
    evals = {"train_loss": 2.0 * np.exp(-rate * t), "test_loss": np.r_[at_end, 0.1],
             "test_metric": np.r_[at_end, metric]}
    return TrainingRun(name, lr, log, t, evals, settings={"seed": seed})


def fake_grid(task):
    """AdamW (grid 1e-3, 3e-3, 9e-3) and "Other" (0.1, 0.3, 0.9), with known decay rates per lr."""
    registry = {"AdamW": entry(torch.optim.AdamW, "backward", lr=3e-3), "Other": entry(torch.optim.SGD, lr=0.3)}
    factors = [1 / 3, 1.0, 3.0]
    rates = {"AdamW": [0.01, 0.03, 0.02], "Other": [0.005, 0.05, 0.05]}
    runs = {}
    for name, by_lr in rates.items():
        for i, (lr, rate) in enumerate(zip(registry[name].grid(factors), by_lr)):
            for seed in (0, 1, 2):
                status = "diverged" if (name == "Other" and i == 2 and seed == 0) else "ok"
                runs[(name, lr, seed)] = fake_run(name, lr, seed, rate * (1 + 0.1 * seed), status=status,
                                                  metric=90.0 + seed, step_time=0.01 if name == "AdamW" else 0.04)
    return Grid(task, ["AdamW", "Other"], [0, 1, 2], factors, 100, 8, 10, registry,
                {"AdamW": 3e-3, "Other": 0.3}, runs)


def test_summarise_gives_the_exact_answers_on_known_curves(task):
    grid = fake_grid(task)
    # the rule fixed in advance: AdamW's (best lr 3e-3) median loss at step 60
    assert target_loss(grid) == pytest.approx(2 * math.exp(-0.033 * 60))
    summary = summarise(grid, target=2 * math.exp(-1.0))
    adamw, other = summary.rows["AdamW"], summary.rows["Other"]
    assert adamw.best_lr == grid.lrs("AdamW")[1] and not adamw.best_at_edge
    # loss <= 2/e once rate * t >= 1: seeds have rates 0.03, 0.033, 0.036 -> first recorded t = 40, 40, 30
    assert [reach(r, summary.target)[0] for r in adamw.runs] == [40, 40, 30]
    assert adamw.steps_to_target == 40 and adamw.seconds_to_target == pytest.approx(0.4) and adamw.hits == 3
    assert adamw.metric_mean == pytest.approx(91.0) and adamw.metric_std == pytest.approx(1.0)
    # "Other": 0.3 and 0.9 tie on the median curve, but 0.9 has a diverged seed (inf): the median still ties,
    # so the smaller lr wins; nothing diverged at 0.3
    assert other.best_lr == grid.lrs("Other")[1] and other.diverged_grid == 1 and other.total_grid == 9
    assert other.divergence_fraction == pytest.approx(1 / 9)
    assert other.step_ratio == pytest.approx(4.0) and adamw.step_ratio == pytest.approx(1.0)
    assert other.steps_to_target == 20 and other.seconds_to_target == pytest.approx(0.8)
    assert summary.winner("steps") == "Other" and summary.winner("seconds") == "AdamW"
    # a weak baseline: AdamW at a hand-picked bad grid lr
    weak = summarise(grid, lrs={"AdamW": 1e-3}, target=2 * math.exp(-1.0))  # rounding: snapped to the grid key
    assert weak.rows["AdamW"].chosen == "grid" and weak.rows["AdamW"].steps_to_target == 100
    assert weak.winner("seconds") == "Other"
    assert "target training loss" in summary.table()


def test_best_at_the_edge_is_flagged(task):
    grid = fake_grid(task)
    top = grid.lrs("AdamW")[-1]
    for seed in (0, 1, 2):
        grid.runs[("AdamW", top, seed)] = fake_run("AdamW", top, seed, 0.1)
    row = summarise(grid).rows["AdamW"]
    assert row.best_lr == top and row.best_at_edge


def test_char_lm_task_runs_every_closure_kind():
    task = char_lm_task(num_chars=3_000, length=8, dim=8, heads=2, eval_windows=16)
    for name in ("AdamW", "Sophia-G (GNB, k=10)", "K-FAC (f=10, i=100)"):
        run = train_run(task, name, REGISTRY[name].centre, 0, 3, 4, 1)
        assert run.ok, run.log.message
        assert run.final("test_metric") == pytest.approx(run.final("test_loss") / math.log(2))
    assert task.metric == "bits/char" and not task.higher_is_better
    kfac = train_run(task, "K-FAC (f=10, i=100)", 0.1, 0, 1, 4, 1)
    assert any("fallback" in w for w in kfac.extra["warnings"])  # LayerNorm and Embedding: named, not hidden
    assert PILOT_FACTORS[2] == 1.0
