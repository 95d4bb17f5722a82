"""Optimizer benchmark: hesskit's second-order optimizers against SGD and AdamW, one protocol for all.

    python bench/optimizers.py            # the README tables and plots (about 20 minutes on 2 free CPU cores)
    python bench/optimizers.py --quick    # tiny models and budgets: checks that the script runs (< 60 s)
    python bench/optimizers.py --from-results bench/results/optimizers_runs.json  # report saved runs again

Protocol, identical for every optimizer of BENCH_REGISTRY: notebook 10's registry, tasks, training run and summary
(`hesskit.experiments.shootout`), on bigger models and budgets:
* Tasks: `SmallCNN` (6,090 parameters) on the scikit-learn digits, minibatches of 128, 300 steps; and
  `CharTransformerLM` (2 causal blocks, 28,186 parameters) on `hk.data.text` (100k characters, windows of 32),
  minibatches of 32 windows, 400 steps. Seed s fixes the model's initialisation and the minibatch order.
* Learning rates: the same 5-point grid for everyone, the optimizer's default lr times {1/9, 1/3, 1, 3, 9}. The
  default is the constructor's own, except SGD (momentum 0.9), whose grid is centred on the usual 0.1 (torch's
  default 1e-3 is a placeholder). Every other hyperparameter keeps its default, except Newton-CG's CG iterations,
  capped at 10 per step (default 100: one 400-step LM run would take ~15 minutes). AdaHessian runs twice: as the
  official code (D refreshed every step) and with D refreshed every 2 steps (`update_every=2`, davda54's
  `update_each`), the delayed refresh that brings its step cost near a first-order step's. Every (lr, seed) pair is run,
  seeds 0, 1, 2.
* Best lr: the lowest median (over seeds) final training loss (a fixed training subset, evaluated every 10 steps);
  a diverged run (FloatingPointError from the closure contract, a nan/inf loss, or a final training loss above
  the initial one) counts as infinite. Other exceptions are reported as errors (and also count as infinite).
* Target: the training loss that AdamW (at its best lr, median over seeds) reaches at 60% of the budget. Steps to
  target: median over seeds ("> budget" when the median seed does not get there). Seconds to target: those steps
  times the mean step time below (the time measured inside the training runs depends on whatever else the machine
  was running; it is saved, per run, in bench/results/optimizers_runs.json, as are all curves).
* Step time relative to AdamW: every optimizer at its best lr takes steps in turn on the same minibatches (interleaved,
  1 thread, 10 warm-up steps then 200 timed, which include two K-FAC inverse refreshes and 20 Sophia refreshes); both
  the median step and the mean step (amortised: includes the curvature refreshes every k steps) are given. The
  targets are judged on the mean.
* Memory relative to AdamW: growth of peak memory while training 110 steps at the best lr, seed 0, in a fresh process
  per optimizer, after 2 steps of the same optimizer on a throwaway model (so that library code and modules loaded
  on first use do not count). On CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs, Linux) minus the RSS
  before training, with glibc's malloc returning freed blocks >= 64 KiB at once; on CUDA: max_memory_allocated minus
  memory_allocated. It covers activations, autograd graphs, optimizer state and linear-algebra workspaces.
* Training runs go to a pool of 2 worker processes with torch.set_num_threads(1) each; CUDA is used if available.
* --quick: tiny models, 12 steps, seed 0 only, memory for 2 optimizers on digits; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hesskit.experiments.shootout import (  # noqa: E402
    BENCH_REGISTRY,
    LR_FACTORS,
    Grid,
    Row,
    Summary,
    run_from_record,
    run_to_record,
    summarise,
    target_loss,
    target_step,
    train_run,
)
from hesskit.experiments.tasks import Task, char_lm_task, digits_task  # noqa: E402
from hesskit.experiments.training import TrainingRun, random_batches  # noqa: E402
from hesskit.optim import make_closure  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TASKS = ("digits", "char LM")


# ------------------------------------------------------------------ the tasks and their budgets
@dataclass(frozen=True)
class Setup:
    """One task of the benchmark and its budget: `steps` steps of `batch_size` examples, the training loss recorded
    every `record_every` steps."""

    name: str  # "digits" or "char LM"
    task: Task
    steps: int
    batch_size: int
    record_every: int

    def run(self, name: str, lr: float, seed: int, steps: int | None = None, record: bool = True) -> TrainingRun:
        """One training run of BENCH_REGISTRY[name] (`record=False`: no evaluation at all, for memory and warnings)."""
        return train_run(self.task, name, lr, seed, self.steps if steps is None else steps, self.batch_size,
                         self.record_every if record else None, BENCH_REGISTRY)


@functools.lru_cache(maxsize=None)
def make_setup(name: str, quick: bool) -> Setup:
    """The digits SmallCNN (training loss on every training image; accuracy counted in float32, as this benchmark
    always has) or the character LM (training loss on the first 128 windows), on DEVICE."""
    every = 2 if quick else 10
    if name == "digits":
        cnn = digits_task("cnn", channels=(4, 8) if quick else (16, 32))
        task = replace(cnn.to(DEVICE), accuracy_dtype=torch.float32)
        return Setup(name, task, 12 if quick else 300, 64 if quick else 128, every)
    size = dict(num_chars=8_000, length=16, dim=16, blocks=1, heads=2, mlp_ratio=2) if quick else \
        dict(num_chars=100_000, length=32, dim=32, blocks=2, heads=4, mlp_ratio=4)
    return Setup(name, char_lm_task(**size, eval_windows=128).to(DEVICE), 12 if quick else 400, 8 if quick else 32,
                 every)


def make_grid(setup: Setup, names: list[str], seeds: list[int], runs: dict[tuple[str, float, int], TrainingRun]
              ) -> Grid:
    """The runs of one task as a `Grid` (every lr of every optimizer's grid, every seed), ready for `summarise`."""
    ordered = {(n, lr, s): runs[(n, lr, s)] for n in names for lr in BENCH_REGISTRY[n].grid() for s in seeds}
    return Grid(setup.task, list(names), list(seeds), list(LR_FACTORS), setup.steps, setup.batch_size,
                setup.record_every, BENCH_REGISTRY, {n: BENCH_REGISTRY[n].centre for n in names}, ordered)


# ------------------------------------------------------------------ training runs and memory (in workers)
def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def init_worker():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # runs collect their warnings (K-FAC/MKOR fallbacks), reported once per optimizer


def run_job(job: tuple) -> tuple:
    """Worker: one (task, optimizer, lr, seed) run; exceptions other than divergence end it with status "error"."""
    task_name, quick, name, lr, seed = job
    return job, make_setup(task_name, quick).run(name, lr, seed)


def reset_peak_memory() -> int:
    """Reset the peak and return the memory in use now (bytes): CUDA allocator, or RSS via /proc on Linux."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
    return _proc_status("VmRSS")


def peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def memory_job(job: tuple) -> tuple:
    """Fresh worker process: growth of peak memory (MB) while training `steps` steps, no evaluation.

    Two steps of the same optimizer on a throwaway model first load the library code and modules
    it uses (torch.optim alone imports tens of MB on its first step), so that they do not count."""
    task_name, quick, name, lr, steps = job
    init_worker()
    setup = make_setup(task_name, quick)
    try:
        setup.run(name, lr, 1, steps=2, record=False)
        base = reset_peak_memory()
        ok = setup.run(name, lr, 0, steps=steps, record=False).ok
    except Exception:  # noqa: BLE001 (the training runs report errors)
        ok = False
    return job, (peak_memory() - base) / 2**20 if ok else math.nan


# ------------------------------------------------------------------ interleaved step timing (main process)
def step_times(setup: Setup, best_lrs: dict[str, float], warmup: int, repeat: int) -> dict[str, tuple[float, float]]:
    """(median, mean) seconds per step for each optimizer, all taking turns on the same minibatches."""
    torch.set_num_threads(1)
    task = setup.task
    runners = {name: None for name in best_lrs}
    times: dict[str, list[float]] = {name: [] for name in best_lrs}

    def fresh(name):
        model = task.model(0)
        return model, BENCH_REGISTRY[name].make(model, best_lrs[name])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, idx in enumerate(random_batches(len(task.train[0]), warmup + repeat, setup.batch_size, 0)):
            idx = idx.to(DEVICE)
            xb, yb = task.train[0][idx], task.train[1][idx]
            names = list(runners)
            names = names[step % len(names):] + names[: step % len(names)]  # rotate who goes first
            for name in names:
                if runners[name] is None:
                    runners[name] = fresh(name)
                model, opt = runners[name]
                closure = make_closure(BENCH_REGISTRY[name].closure, opt, lambda model=model: task.loss(model(xb), yb))
                start = time.perf_counter()
                try:
                    opt.step(closure)
                except Exception:  # noqa: BLE001 (diverged, or failed: restart from a fresh model, keep timing)
                    runners[name] = None
                sync()
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), statistics.fmean(t)) for name, t in times.items()}


# ------------------------------------------------------------------ reporting
def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(b) else math.nan


def memory_cell(mb: float, ref_mb: float) -> str:
    return "n/a" if math.isnan(mb) else f"{fmt(ratio(mb, ref_mb), '.2f')} ({mb:.1f} MB)"


def fmt(value: float, spec: str, budget: int | None = None) -> str:
    if math.isinf(value):
        return f"> {budget}" if budget else "n/a"
    return "n/a" if math.isnan(value) else format(value, spec)


def print_table(setup: Setup, summary: Summary, timing: dict, memory: dict, seeds: list[int]) -> None:
    ref_time = timing.get("AdamW", (math.nan, math.nan))
    ref_mem = memory.get("AdamW", math.nan)
    metric = "test accuracy %" if summary.metric == "accuracy" else "test bits/char"
    print(f"\n### {setup.name}: {setup.steps} steps, batch {setup.batch_size}, seeds {seeds}\n")
    print(f"Target training loss {summary.target:.4f} (AdamW's median at step {target_step(setup.steps)}). "
          f"AdamW step: {ref_time[0] * 1e3:.1f} ms median, {ref_time[1] * 1e3:.1f} ms mean; "
          f"AdamW memory growth {ref_mem:.1f} MB.\n")
    print(f"| optimizer | lr grid | best lr | diverged | final train loss | steps to target | s to target | {metric} "
          "| step time x AdamW (median / mean) | memory x AdamW |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in summary.rows.items():
        print(table_row(setup, row, timing.get(name, (math.nan, math.nan)), ref_time, memory.get(name, math.nan),
                        ref_mem))
    print("\n`*` best lr at the edge of the grid. Steps to target: median over seeds (seeds that reached it), "
          f"the training loss being recorded every {setup.record_every} steps. Seconds to target: those steps times "
          "the mean (amortised) step time from the interleaved timing; the seconds measured inside the training "
          "runs, which shared the machine, are in the JSON file.")
    for name, row in summary.rows.items():
        for message in row.errors:
            print(f"- {name}: error at {message[:300]}")


def table_row(setup: Setup, row: Row, t: tuple[float, float], ref_time: tuple[float, float], mem: float,
              ref_mem: float) -> str:
    """One optimizer's line of the table (`row`: its `summarise` row at the best lr of its grid)."""
    if row.errors and all(r.log.status == "error" for r in row.runs):
        return f"| {row.name} | error: {row.errors[0][:80]} | | | | | | | | |"
    errors = len(row.errors)
    secs = row.steps_to_target * t[1]
    spread = f"{row.metric_mean:.2f} +- {row.metric_std:.2f}" if row.finished else "n/a"
    spread += f" ({row.finished}/{len(row.runs)} seeds)" if row.finished < len(row.runs) else ""
    edge = "*" if row.best_at_edge else ""
    return (f"| {row.name} | {', '.join(f'{lr:.3g}' for lr in row.scores)} | {row.best_lr:.3g}{edge} "
            f"| {row.diverged_grid - errors}/{row.total_grid}{f' (+{errors} errors)' if errors else ''} "
            f"| {fmt(row.final_loss, '.4f')} | {fmt(row.steps_to_target, '.0f', setup.steps)} "
            f"({row.hits}/{len(row.runs)}) | {fmt(secs, '.1f')} | {spread} | {ratio(t[0], ref_time[0]):.2f} / "
            f"{ratio(t[1], ref_time[1]):.2f} | {memory_cell(mem, ref_mem)} |")


def plot(setup: Setup, summary: Summary, timing: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_steps, ax_secs) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in summary.rows.items():
        ok = [r for r in row.runs if r.ok and len(r.eval_steps) > 1]
        if not ok:
            continue
        n = min(len(r.eval_steps) for r in ok)
        steps = [int(s) for s in ok[0].eval_steps[:n]]
        loss = [statistics.median(float(r.evals["train_loss"][i]) for r in ok) for i in range(n)]
        label = f"{name} (lr {row.best_lr:.3g})"
        ax_steps.plot(steps, loss, label=label)
        step_seconds = timing.get(name, (math.nan, math.nan))[1]
        ax_secs.plot([k * step_seconds for k in steps[1:]], loss[1:], label=label)
    ax_secs.set_xscale("log")
    for ax, xlabel in ((ax_steps, "step"), (ax_secs, "seconds (step x mean step time, 1 thread; log scale)")):
        ax.axhline(summary.target, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlabel=xlabel, ylabel="training loss (cross-entropy, log scale)", yscale="log")
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g") if high < 10 * low
                                     else matplotlib.ticker.NullFormatter())  # label 2, 3, ... only within a decade
    ax_steps.set_title(f"{setup.name}: median over seeds, best lr each (dashed: target)", fontsize=9)
    ax_secs.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"optimizers_{setup.name.replace(' ', '_')}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_runs(path: Path, quick: bool, seeds: list[int], grids: dict[str, Grid], timings: dict, memory: dict) -> None:
    """Every run's record (`run_to_record`: curve and result), the step times and memory, as JSON."""
    runs = [{"task": t, **run_to_record(run)} for t, grid in grids.items() for run in grid.runs.values()]
    path.write_text(json.dumps({"quick": quick, "seeds": seeds, "runs": runs, "step_seconds_median_mean": timings,
                                "memory_mb": memory, "targets": {t: target_loss(grid) for t, grid in grids.items()}},
                               indent=0))


def load_runs(path: Path) -> tuple:
    """What `save_runs` wrote: (quick, seeds, grids, timings, memory)."""
    saved = json.loads(path.read_text())
    quick, seeds = saved["quick"], saved["seeds"]
    grids = {}
    for t in TASKS:
        runs = {(r["optimizer"], r["lr"], r["seed"]): run_from_record(r) for r in saved["runs"] if r["task"] == t}
        grids[t] = make_grid(make_setup(t, quick), [n for n in BENCH_REGISTRY if any(k[0] == n for k in runs)], seeds,
                             runs)
    timings = {t: {n: tuple(v) for n, v in saved["step_seconds_median_mean"][t].items()} for t in TASKS}
    return quick, seeds, grids, timings, saved["memory_mb"]


def print_targets(timings: dict) -> None:
    print("\n### Per-step time targets (mean step, amortised, relative to AdamW)\n")
    print("| optimizer | target | " + " | ".join(timings) + " | met |")
    print("|---|---:|" + "---:|" * len(timings) + "---|")
    for name, entry in BENCH_REGISTRY.items():
        if entry.max_step_ratio is None or not all(name in t for t in timings.values()):
            continue
        ratios = [ratio(t[name][1], t["AdamW"][1]) for t in timings.values()]
        met = "yes" if all(r <= entry.max_step_ratio for r in ratios) else "no"
        print(f"| {name} | <= {entry.max_step_ratio}x | " + " | ".join(f"{r:.2f}x" for r in ratios) + f" | {met} |")


# ------------------------------------------------------------------ main
def train_grids(names: list[str], seeds: list[int], quick: bool, workers: int) -> dict[str, Grid]:
    """Every (task, optimizer, lr, seed) run, in a pool; returns each task's `Grid`."""
    jobs = [(t, quick, n, lr, s) for t in reversed(TASKS) for n in reversed(names) for lr in BENCH_REGISTRY[n].grid()
            for s in seeds]  # the slow ones (the LM, Newton-CG) first, for load balance
    results, start = {}, time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
        for job, result in pool.imap_unordered(run_job, jobs):
            results[job] = result
            if len(results) % 20 == 0:
                print(f"  {len(results)}/{len(jobs)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return {t: make_grid(make_setup(t, quick), names, seeds,
                         {(n, lr, s): r for (task, _, n, lr, s), r in results.items() if task == t}) for t in TASKS}


def measure_memory(best: dict[str, dict[str, float]], quick: bool, workers: int) -> dict[str, dict[str, float]]:
    """Peak-memory growth (MB) per task and optimizer, one fresh process each (quick: 2 on digits only)."""
    jobs = [(t, quick, n, lr, 6 if quick else 110) for t in TASKS for n, lr in best[t].items()]
    jobs = [j for j in jobs if j[0] == "digits" and j[2] in ("AdamW", list(best["digits"])[-1])] if quick else jobs
    # glibc's malloc returns freed blocks >= 64 KiB to the system at once (no adaptive threshold), so the
    # warm-up's freed tensors are not silently reused by the measured run.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
            done = dict(pool.imap_unordered(memory_job, jobs))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return {t: {n: mb for (task, _, n, _, _), mb in done.items() if task == t} for t in TASKS}


def measure(seeds: list[int], quick: bool, workers: int) -> tuple:
    """The training grids, the memory runs and the interleaved timing: (grids, timings, memory)."""
    start = time.perf_counter()
    grids = train_grids(list(BENCH_REGISTRY), seeds, quick, workers)
    print(f"\nTraining runs: {time.perf_counter() - start:.0f} s")
    best = best_lrs({t: summarise(grid) for t, grid in grids.items()})
    lap = time.perf_counter()
    memory = measure_memory(best, quick, workers)
    print(f"Memory runs: {time.perf_counter() - lap:.0f} s")
    lap = time.perf_counter()
    timings = {t: step_times(make_setup(t, quick), best[t], warmup=2 if quick else 10, repeat=6 if quick else 200)
               for t in TASKS}
    print(f"Interleaved step timing: {time.perf_counter() - lap:.0f} s")
    return grids, timings, memory


def best_lrs(summaries: dict[str, Summary]) -> dict[str, dict[str, float]]:
    """Each optimizer's best lr per task, for those whose median seed did not diverge there."""
    return {t: {n: row.best_lr for n, row in summaries[t].rows.items() if math.isfinite(row.final_loss)}
            for t in TASKS}


def report(quick: bool, seeds: list[int], grids: dict[str, Grid], timings: dict, memory: dict, out: Path) -> None:
    summaries = {t: summarise(grids[t]) for t in TASKS}
    best = best_lrs(summaries)
    for t in TASKS:
        setup = make_setup(t, quick)
        print_table(setup, summaries[t], timings[t], memory[t], seeds)
        for n in best[t]:
            for message in setup.run(n, best[t][n], 0, steps=1, record=False).extra["warnings"]:
                print(f"- {n} warns: {message}")
        print(f"\nPlot: {plot(setup, summaries[t], timings[t], out)}")
    print_targets(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and budgets: check that the script runs")
    parser.add_argument("--workers", type=int, default=2, help="training processes in parallel (1 thread each)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the plots (default bench/results)")
    parser.add_argument("--from-results", type=Path, default=None, help="report a saved optimizers_runs.json again")
    args = parser.parse_args()
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    print(f"hesskit optimizer benchmark: torch {torch.__version__}, {DEVICE}, float32, {args.workers} workers x 1 thread")
    start = time.perf_counter()
    if args.from_results:
        quick, seeds, grids, timings, memory = load_runs(args.from_results)
    else:
        quick, seeds = args.quick, [0] if args.quick else [0, 1, 2]
        grids, timings, memory = measure(seeds, quick, args.workers)
        save_runs(out / "optimizers_runs.json", quick, seeds, grids, timings, memory)
    report(quick, seeds, grids, timings, memory, out)
    print(f"\nTotal {time.perf_counter() - start:.0f} s")
    if args.quick and args.out is None:
        shutil.rmtree(out)  # quick mode leaves nothing behind
    else:
        print(f"Plots and every run's curve (optimizers_runs.json) in {out}")


if __name__ == "__main__":
    main()
