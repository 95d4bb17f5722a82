import matplotlib

matplotlib.use("Agg")

import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hesskit.widgets.shootout import (  # noqa: E402
    LR_FACTORS,
    BEST,
    LR_OPTIONS,
    PILOT_FACTORS,
    REGISTRY,
    TARGET_FRACTION,
    Grid,
    Run,
    ShootoutExplorer,
    batch_indices,
    char_lm_task,
    digits_task,
    entry,
    reach,
    run_grid,
    summarise,
    target_loss,
    train_run,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, EVERY = 6, 16, 2
SEEDS = (0, 1)
FACTORS = (1 / 3, 1.0, 3.0)


@pytest.fixture(scope="module")
def task():
    return digits_task((2, 4), eval_size=128)


@pytest.fixture(scope="module")
def grid(task):
    """Every registry optimizer, 3 lrs x 2 seeds x 6 steps, after a 3-point pilot of 3 steps."""
    return run_grid(task, seeds=SEEDS, steps=STEPS, batch_size=BATCH, record_every=EVERY, factors=FACTORS,
                    pilot_factors=(1 / 9, 1.0, 9.0), pilot_steps=3)


WIDGET_NAMES = ["AdamW", "Sophia-G (GNB, k=10)", "K-FAC (f=10, i=100)"]  # one of each closure kind


@pytest.fixture()
def small_grid(task):
    """Three optimizers, no pilot (grids centred on the defaults); a fresh grid per test (extra runs accumulate)."""
    return run_grid(task, names=WIDGET_NAMES, seeds=SEEDS, steps=STEPS, batch_size=BATCH, record_every=EVERY,
                    factors=FACTORS)


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
    assert tuple(bench.LR_FACTORS) == LR_FACTORS
    assert bench.TARGET_FRACTION == TARGET_FRACTION
    assert [name for name in bench.REGISTRY if name not in bench.BENCH_ONLY] == list(REGISTRY)
    for name, theirs in bench.REGISTRY.items():
        if name in bench.BENCH_ONLY:
            continue
        ours = REGISTRY[name]
        assert ours.cls is theirs.resolve(), name
        assert ours.kwargs == theirs.kwargs and ours.closure == theirs.closure, name
        assert ours.takes_model == theirs.takes_model, name
        assert ours.grid() == pytest.approx(theirs.lrs()), name


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
def test_batch_indices_are_fixed_by_the_seed():
    a, b, c = batch_indices(100, 5, 8, 0), batch_indices(100, 5, 8, 0), batch_indices(100, 5, 8, 1)
    assert a.shape == (5, 8) and a.min() >= 0 and a.max() < 100
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(a[0], torch.randint(100, (8,), generator=gen))  # step by step, as the benchmark


def test_every_optimizer_starts_from_the_same_weights_and_records_the_same_points(grid):
    for seed in SEEDS:
        starts = {r.train_loss[0] for (n, lr, s), r in grid.runs.items() if s == seed}
        assert len(starts) == 1  # same initialisation for every optimizer and lr
    for run in grid.runs.values():
        assert run.status in ("ok", "diverged"), run.message  # no optimizer errors on a CNN
        if run.ok:
            assert list(run.steps) == [0, 2, 4, 6] and run.steps_taken == STEPS
            assert np.all(np.diff(run.seconds) >= 0) and run.total_seconds >= run.seconds[-1]
            assert run.final_loss <= run.train_loss[0]
            assert 0 <= run.test_metric <= 100


def test_runs_are_deterministic_and_the_harness_is_reused_for_extra_runs(task, grid):
    lr = grid.lrs("AdamW")[1]
    again = grid.train("AdamW", lr, 1)
    np.testing.assert_array_equal(again.train_loss, grid.runs[("AdamW", lr, 1)].train_loss)
    assert again.test_metric == grid.runs[("AdamW", lr, 1)].test_metric


def test_divergence_and_errors_are_counted_not_hidden(task):
    run = train_run(task, "SGD (momentum 0.9)", 1e4, 0, STEPS, BATCH, EVERY)
    assert run.status == "diverged" and run.final_loss == math.inf and math.isnan(run.test_metric)

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("broken on purpose")

    registry = {"broken": entry(Broken, "backward", lr=0.1)}
    run = train_run(task, "broken", 0.1, 0, STEPS, BATCH, EVERY, registry=registry)
    assert run.status == "error" and "broken on purpose" in run.message and run.final_loss == math.inf


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
    loss = 2.0 * np.exp(-rate * t)
    return Run(name, lr, seed, status, t, loss, t * step_time, steps, steps * step_time, 0.1, metric)


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


# --------------------------------------------------------------------------- the widget
def test_explorer_drives_every_control(small_grid, monkeypatch):
    grid = small_grid
    explorer = ShootoutExplorer(grid)
    explorer.show()
    assert explorer.output.outputs[0]["data"]["image/png"]  # one real render; the rest skip the PNG encoding
    monkeypatch.setattr("hesskit.widgets.explorer.figure_output", lambda figure: {"output_type": "display_data",
                                                                               "data": {}, "metadata": {}})
    c = explorer.controls
    r = explorer.result
    assert r["target"] == pytest.approx(target_loss(grid), rel=0.05) or r["target"] in (10 ** c["target"].min,
                                                                                          10 ** c["target"].max)
    assert list(r["summary"].rows) == grid.names
    best = {n: row.best_lr for n, row in r["summary"].rows.items()}

    # optimizers: every single one, then all
    for name in grid.names:
        c["optimizers"].value = (name,)
        assert list(explorer.result["summary"].rows) == [name]
        assert len(explorer.figure.axes) >= 3
    c["optimizers"].value = ()  # nothing selected: an empty table, no error
    assert explorer.result["summary"].rows == {} and explorer.result["winner_steps"] is None
    c["optimizers"].value = tuple(grid.names)

    # x axis: both options; seconds are cumulative and non-decreasing
    for axis in ("seconds", "steps"):
        c["x_axis"].value = axis
        assert explorer.result["x_axis"] == axis
        for row in explorer.result["summary"].rows.values():
            x, mean, low, high = row.curve(axis)
            assert np.all(np.diff(x) >= 0) and np.all(low <= mean + 1e-12) and np.all(mean <= high + 1e-12)

    # target: extremes; steps to target can only fall as the target rises
    c["target"].value = 10 ** c["target"].min
    low_rows = explorer.result["summary"].rows
    c["target"].value = 10 ** c["target"].max
    high_rows = explorer.result["summary"].rows
    assert explorer.result["target"] == pytest.approx(10 ** c["target"].max)
    for name in grid.names:
        assert high_rows[name].steps_to_target <= low_rows[name].steps_to_target
        assert high_rows[name].hits >= low_rows[name].hits
    assert all(row.steps_to_target == 0 for row in high_rows.values() if row.finished == len(row.runs)
               and all(r.train_loss[0] <= explorer.result["target"] for r in row.runs))

    # lr: every option for one optimizer; grid points are looked up, off-grid points are extra runs
    c["lr_of"].value = "AdamW"
    for label, factor in LR_OPTIONS:
        c["lr"].value = factor
        row = explorer.result["summary"].rows["AdamW"]
        if factor == BEST:
            assert row.chosen == "best from grid" and row.lr == best["AdamW"]
        else:
            assert row.lr == pytest.approx(grid.centre("AdamW") * factor)
            on_grid = any(math.isclose(factor, f) for f in FACTORS)
            assert row.chosen == ("grid" if on_grid else "extra"), label
        assert row.best_lr == best["AdamW"]  # extra runs never change the tuning result
    assert grid.extra and all(k[0] == "AdamW" for k in grid.extra)

    # lr_of: switching shows that optimizer's own choice, and choices stay per optimizer
    c["lr"].value = 3.0
    for name in grid.names:
        c["lr_of"].value = name
        assert c["lr"].value == (3.0 if name == "AdamW" else BEST) and c["lr"].index is not None  # never blank
        if name != "AdamW":
            assert explorer.result["summary"].rows[name].lr == best[name]
    assert explorer.result["summary"].rows["AdamW"].lr == pytest.approx(grid.centre("AdamW") * 3.0)
    assert explorer.result["choices"]["AdamW"] == 3.0


def test_char_lm_task_runs_every_closure_kind():
    task = char_lm_task(num_chars=3_000, length=8, dim=8, heads=2, eval_windows=16)
    for name in ("AdamW", "Sophia-G (GNB, k=10)", "K-FAC (f=10, i=100)"):
        run = train_run(task, name, REGISTRY[name].centre, 0, 3, 4, 1)
        assert run.ok, run.message
        assert run.test_metric == pytest.approx(run.test_loss / math.log(2))
    assert task.metric == "bits/char" and not task.higher_is_better
    kfac = train_run(task, "K-FAC (f=10, i=100)", 0.1, 0, 1, 4, 1)
    assert any("fallback" in w for w in kfac.warnings)  # LayerNorm and Embedding: named, not hidden
    assert PILOT_FACTORS[2] == 1.0


# --------------------------------------------------------------------------- progress
def test_explorer_shows_progress_of_extra_runs(small_grid, monkeypatch):
    monkeypatch.setattr("hesskit.widgets.explorer.figure_output", lambda figure: {"output_type": "display_data",
                                                                               "data": {}, "metadata": {}})
    explorer = ShootoutExplorer(small_grid)
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.show()  # stored runs only: no training, no progress bar
    assert not any("<progress" in v for v in seen)
    explorer.controls["lr_of"].value = "AdamW"
    explorer.controls["lr"].value = 3**0.5  # between two grid points: one extra run per seed
    bars = [v for v in seen if "<progress" in v]
    lr = small_grid.centre("AdamW") * 3**0.5
    assert f"AdamW, lr {lr:.3g}: extra run 0/{len(SEEDS)}" in bars[0]
    assert f"AdamW, lr {lr:.3g}: extra run {len(SEEDS)}/{len(SEEDS)}" in bars[-1]
    assert explorer.status.value == ""
