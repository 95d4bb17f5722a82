"""Optimizer benchmark: hesskit's second-order optimizers against SGD and AdamW, one protocol for all.

    python bench/optimizers.py            # the README tables and plots (about 20 minutes on 2 free CPU cores)
    python bench/optimizers.py --quick    # tiny models and budgets: checks that the script runs (< 60 s)
    python bench/optimizers.py --from-results bench/results/optimizers_runs.json  # report saved runs again

Protocol, identical for every optimizer in REGISTRY (entries whose class does not import are skipped):
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
import importlib
import inspect
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hesskit as hk  # noqa: E402
from hesskit.optim import make_closure as closure_for  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LR_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
TARGET_FRACTION = 0.6  # target = AdamW's training loss at 60% of the budget


# ------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Entry:
    """One optimizer: its class (resolved lazily), fixed keyword arguments, closure kind and lr grid centre."""

    cls: str  # "torch.optim.AdamW" or "hesskit.optim.Sophia"
    kwargs: dict = field(default_factory=dict)
    closure: str = "loss"  # "backward" (torch optimizers), "loss" (hesskit contract), "loss_outputs" ((loss, logits))
    takes_model: bool = False  # K-FAC and MKOR take the model, the others its parameters
    lr: float | None = None  # centre of the lr grid; None: the constructor's default
    max_step_ratio: float | None = None  # per-step time target relative to AdamW (amortised)

    def resolve(self) -> type | None:
        module, _, name = self.cls.rpartition(".")
        return getattr(importlib.import_module(module), name, None)

    def lrs(self) -> list[float]:
        centre = self.lr if self.lr is not None else inspect.signature(self.resolve()).parameters["lr"].default
        if not isinstance(centre, float):
            raise ValueError(f"{self.cls} has no default lr: give the registry entry an lr")
        return [centre * f for f in LR_FACTORS]

    def make(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return self.resolve()(model if self.takes_model else model.parameters(), lr=lr, **self.kwargs)


REGISTRY: dict[str, Entry] = {
    "SGD (momentum 0.9)": Entry("torch.optim.SGD", {"momentum": 0.9}, "backward", lr=0.1),
    "AdamW": Entry("torch.optim.AdamW", closure="backward"),
    "AdaHessian": Entry("hesskit.optim.AdaHessian", max_step_ratio=3.0),
    "AdaHessian (D every 2 steps)": Entry("hesskit.optim.AdaHessian", {"update_every": 2}, max_step_ratio=3.0),
    "Sophia-H (Hutchinson, k=10)": Entry("hesskit.optim.Sophia", {"estimator": "hutchinson"}, max_step_ratio=1.3),
    "Sophia-G (GNB, k=10)": Entry("hesskit.optim.Sophia", {"estimator": "gnb"}, "loss_outputs", max_step_ratio=1.3),
    "K-FAC (f=10, i=100)": Entry("hesskit.optim.KFAC", takes_model=True, max_step_ratio=2.0),
    "MKOR": Entry("hesskit.optim.MKOR", takes_model=True, max_step_ratio=2.0),
    "M-FAC (m=32)": Entry("hesskit.optim.MFAC", {"num_grads": 32}, max_step_ratio=2.0),
    "Newton-CG (GGN, 10 CG iters)": Entry("hesskit.optim.NewtonCG", {"curvature": "ggn", "max_cg_iters": 10},
                                          "loss_outputs"),
}

# Entries measured here only: notebook 10's shootout (hesskit.widgets.shootout.REGISTRY) offers the others,
# with the same settings; notebook 06 covers AdaHessian's delayed refresh.
BENCH_ONLY = ("AdaHessian (D every 2 steps)",)


# ------------------------------------------------------------------ the tasks
@dataclass
class Task:
    name: str
    steps: int
    batch: int
    make_model: Callable[[], nn.Module]
    train: tuple  # (x, y) sampled for minibatches
    train_eval: tuple  # fixed subset of train: the "training loss"
    test: tuple
    metric: str  # "accuracy" or "bits/char"
    record_every: int = 10  # training loss evaluated every this many steps

    def loss(self, outputs, y):
        """Mean cross-entropy and the flattened logits it was computed from (Sophia-G / Newton-CG use them)."""
        logits = outputs.flatten(0, -2)
        return F.cross_entropy(logits, y.flatten()), logits


@functools.lru_cache(maxsize=None)
def make_task(name: str, quick: bool) -> Task:
    on = lambda *ts: tuple(t.to(DEVICE) for t in ts)  # noqa: E731
    if name == "digits":
        (x, y), (xt, yt) = hk.data.digits(seed=0)
        channels = (4, 8) if quick else (16, 32)
        return Task("digits", 12 if quick else 300, 64 if quick else 128, lambda: hk.models.SmallCNN(channels),
                    on(x, y), on(x, y), on(xt, yt), "accuracy", 2 if quick else 10)
    length = 16 if quick else 32
    (x, y), (xt, yt), vocab = hk.data.char_windows(hk.data.text(8_000 if quick else 100_000, seed=0), length)
    size = dict(dim=16, blocks=1, heads=2, mlp_ratio=2) if quick else dict(dim=32, blocks=2, heads=4, mlp_ratio=4)
    return Task("char LM", 12 if quick else 400, 8 if quick else 32,
                lambda: hk.models.CharTransformerLM(len(vocab), max_length=length, **size),
                on(x, y), on(x[:128], y[:128]), on(xt, yt), "bits/char", 2 if quick else 10)


TASKS = ("digits", "char LM")


# ------------------------------------------------------------------ one training run (in a worker)
def make_closure(task: Task, entry: Entry, model: nn.Module, opt, xb, yb) -> Callable:
    """The closure `entry`'s optimizer needs (one shared builder: `hesskit.widgets.explorer.make_closure`)."""
    return closure_for(entry.closure, opt, lambda: task.loss(model(xb), yb))


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data) -> tuple[float, float]:
    """(mean cross-entropy, metric): accuracy in % for digits, bits per character for the LM."""
    x, y = data
    loss, logits = task.loss(model(x), y)
    if task.metric == "accuracy":
        return loss.item(), 100.0 * (logits.argmax(-1) == y.flatten()).float().mean().item()
    return loss.item(), loss.item() / math.log(2)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def train(task: Task, entry: Entry, lr: float, seed: int, steps: int, record: bool = True) -> dict:
    """Train from seed `seed`; record (step, training loss, seconds spent in opt.step) every task.record_every steps."""
    record_every = task.record_every if record else None
    torch.manual_seed(seed)
    model = task.make_model().to(DEVICE)
    opt = entry.make(model, lr)
    order = torch.Generator().manual_seed(seed)
    curve = [(0, evaluate(task, model, task.train_eval)[0], 0.0)] if record_every else []
    elapsed = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(len(task.train[0]), (task.batch,), generator=order).to(DEVICE)
        closure = make_closure(task, entry, model, opt, task.train[0][idx], task.train[1][idx])
        start = time.perf_counter()
        try:
            loss = opt.step(closure)
        except FloatingPointError as err:
            return {"status": "diverged", "message": str(err), "curve": curve}
        sync()
        elapsed += time.perf_counter() - start
        if loss is not None and not math.isfinite(float(loss.detach())):
            return {"status": "diverged", "message": f"loss {float(loss.detach())} at step {step}", "curve": curve}
        if record_every and (step % record_every == 0 or step == steps):
            curve.append((step, evaluate(task, model, task.train_eval)[0], elapsed))
    if curve and not curve[-1][1] <= curve[0][1]:  # nan, or above the initial loss: blown up
        return {"status": "diverged", "message": f"final training loss {curve[-1][1]:.4g}", "curve": curve}
    test_loss, metric = evaluate(task, model, task.test) if record_every else (math.nan, math.nan)
    return {"status": "ok", "curve": curve, "test_loss": test_loss, "metric": metric}


def init_worker():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # K-FAC/MKOR fallback warnings are collected separately (see `collect_warnings`)


def run_job(job: tuple) -> tuple:
    """Worker: one (task, optimizer, lr, seed) run; exceptions other than divergence are reported, not raised."""
    task_name, quick, name, lr, seed = job
    task = make_task(task_name, quick)
    try:
        result = train(task, REGISTRY[name], lr, seed, task.steps)
    except Exception as err:  # noqa: BLE001 (an optimizer bug must not stop the benchmark)
        result = {"status": "error", "message": f"{type(err).__name__}: {err}", "curve": []}
    return job, result


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
    task, entry = make_task(task_name, quick), REGISTRY[name]
    try:
        train(task, entry, lr, 1, 2, record=False)
        base = reset_peak_memory()
        result = train(task, entry, lr, 0, steps, record=False)
    except Exception:  # noqa: BLE001 (the training runs report errors)
        result = {"status": "error"}
    return job, (peak_memory() - base) / 2**20 if result["status"] == "ok" else math.nan


def collect_warnings(task: Task, entry: Entry, lr: float) -> list[str]:
    """The warnings an optimizer gives when built and stepped once (e.g. layers K-FAC cannot precondition)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(task, entry, lr, 0, 1, record=False)
        except Exception:  # noqa: BLE001, S110 (errors are reported by the runs themselves)
            pass
    return sorted({str(w.message).splitlines()[0] for w in caught})


# ------------------------------------------------------------------ interleaved step timing (main process)
def step_times(task: Task, best_lrs: dict[str, float], warmup: int, repeat: int) -> dict[str, tuple[float, float]]:
    """(median, mean) seconds per step for each optimizer, all taking turns on the same minibatches."""
    torch.set_num_threads(1)
    runners = {name: None for name in best_lrs}
    times: dict[str, list[float]] = {name: [] for name in best_lrs}
    gen = torch.Generator().manual_seed(0)

    def fresh(name):
        torch.manual_seed(0)
        model = task.make_model().to(DEVICE)
        return model, REGISTRY[name].make(model, best_lrs[name])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(warmup + repeat):
            idx = torch.randint(len(task.train[0]), (task.batch,), generator=gen).to(DEVICE)
            xb, yb = task.train[0][idx], task.train[1][idx]
            names = list(runners)
            names = names[step % len(names):] + names[: step % len(names)]  # rotate who goes first
            for name in names:
                if runners[name] is None:
                    runners[name] = fresh(name)
                model, opt = runners[name]
                closure = make_closure(task, REGISTRY[name], model, opt, xb, yb)
                start = time.perf_counter()
                try:
                    opt.step(closure)
                except Exception:  # noqa: BLE001 (diverged, or failed: restart from a fresh model, keep timing)
                    runners[name] = None
                sync()
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), statistics.fmean(t)) for name, t in times.items()}


# ------------------------------------------------------------------ aggregation and reporting
def median(values):
    return statistics.median(values) if values else math.inf


def final_loss(result: dict) -> float:
    return result["curve"][-1][1] if result["status"] == "ok" else math.inf


def loss_at(result: dict, step: int) -> float:
    """The training loss at the first recorded step >= `step` (inf for a diverged or failed run)."""
    if result["status"] != "ok":
        return math.inf
    return next((loss for s, loss, _ in result["curve"] if s >= step), math.inf)


def reach(result: dict, target: float) -> float:
    """The first recorded step with training loss <= target, else inf."""
    return next((s for s, loss, _ in result["curve"] if loss <= target), math.inf)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(b) else math.nan


def memory_cell(mb: float, ref_mb: float) -> str:
    return "n/a" if math.isnan(mb) else f"{fmt(ratio(mb, ref_mb), '.2f')} ({mb:.1f} MB)"


def fmt(value: float, spec: str, budget: int | None = None) -> str:
    if math.isinf(value):
        return f"> {budget}" if budget else "n/a"
    return "n/a" if math.isnan(value) else format(value, spec)


def summarise(task: Task, runs: dict, seeds: list[int]) -> dict:
    """Per optimizer: best lr, its seeds' runs, divergence count over the grid, and the target loss."""
    summary = {}
    for name in [n for n in REGISTRY if any(k[0] == n for k in runs)]:
        grid = sorted({k[1] for k in runs if k[0] == name})
        by_lr = {lr: [runs[(name, lr, s)] for s in seeds] for lr in grid}
        scores = {lr: median([final_loss(r) for r in rs]) for lr, rs in by_lr.items()}
        best = min(grid, key=lambda lr: (scores[lr], lr))
        all_runs = [r for rs in by_lr.values() for r in rs]
        summary[name] = dict(grid=grid, best=best, runs=by_lr[best], score=scores[best], by_lr=by_lr,
                             diverged=sum(r["status"] == "diverged" for r in all_runs), total=len(all_runs),
                             errors=[f"lr {lr:.3g}, seed {seed}: {r['message']}" for lr, rs in by_lr.items()
                                     for seed, r in zip(seeds, rs) if r["status"] == "error"])
    adamw = summary.get("AdamW")
    step = round(TARGET_FRACTION * task.steps)
    target = median([loss_at(r, step) for r in adamw["runs"]]) if adamw else math.nan
    return {"optimizers": summary, "target": target, "target_step": step}


def print_table(task: Task, summary: dict, timing: dict, memory: dict, seeds: list[int]) -> None:
    target, rows = summary["target"], summary["optimizers"]
    ref_time = timing.get("AdamW", (math.nan, math.nan))
    ref_mem = memory.get("AdamW", math.nan)
    metric = "test accuracy %" if task.metric == "accuracy" else "test bits/char"
    print(f"\n### {task.name}: {task.steps} steps, batch {task.batch}, seeds {seeds}\n")
    print(f"Target training loss {target:.4f} (AdamW's median at step {summary['target_step']}). "
          f"AdamW step: {ref_time[0] * 1e3:.1f} ms median, {ref_time[1] * 1e3:.1f} ms mean; "
          f"AdamW memory growth {ref_mem:.1f} MB.\n")
    print(f"| optimizer | lr grid | best lr | diverged | final train loss | steps to target | s to target | {metric} "
          "| step time x AdamW (median / mean) | memory x AdamW |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in rows.items():
        if s["errors"] and all(r["status"] == "error" for r in s["runs"]):
            print(f"| {name} | error: {s['errors'][0][:80]} | | | | | | | | |")
            continue
        ok = [r for r in s["runs"] if r["status"] == "ok"]
        errors = sum(r["status"] == "error" for rs in s["by_lr"].values() for r in rs)
        reached = [reach(r, target) if r["status"] == "ok" else math.inf for r in s["runs"]]
        steps, hits = median(reached), sum(math.isfinite(a) for a in reached)
        t, mem = timing.get(name, (math.nan, math.nan)), memory.get(name, math.nan)
        secs = steps * t[1]
        values = [r["metric"] for r in ok]
        spread = f"{statistics.fmean(values):.2f} +- {statistics.stdev(values) if len(values) > 1 else 0:.2f}" \
            if values else "n/a"
        spread += f" ({len(values)}/{len(s['runs'])} seeds)" if len(values) < len(s["runs"]) else ""
        edge = "*" if s["best"] in (s["grid"][0], s["grid"][-1]) else ""
        print(f"| {name} | {', '.join(f'{lr:.3g}' for lr in s['grid'])} | {s['best']:.3g}{edge} "
              f"| {s['diverged']}/{s['total']}{f' (+{errors} errors)' if errors else ''} | {fmt(s['score'], '.4f')} "
              f"| {fmt(steps, '.0f', task.steps)} "
              f"({hits}/{len(reached)}) | {fmt(secs, '.1f')} | {spread} | {ratio(t[0], ref_time[0]):.2f} / "
              f"{ratio(t[1], ref_time[1]):.2f} | {memory_cell(mem, ref_mem)} |")
    print("\n`*` best lr at the edge of the grid. Steps to target: median over seeds (seeds that reached it), "
          f"the training loss being recorded every {task.record_every} steps. Seconds to target: those steps times "
          "the mean (amortised) step time from the interleaved timing; the seconds measured inside the training "
          "runs, which shared the machine, are in the JSON file.")
    for name, s in rows.items():
        for message in s["errors"]:
            print(f"- {name}: error at {message[:300]}")


def plot(task: Task, summary: dict, timing: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_steps, ax_secs) = plt.subplots(1, 2, figsize=(10, 4))
    for name, s in summary["optimizers"].items():
        ok = [r["curve"] for r in s["runs"] if r["status"] == "ok" and len(r["curve"]) > 1]
        if not ok:
            continue
        n = min(len(c) for c in ok)
        steps = [ok[0][i][0] for i in range(n)]
        loss = [statistics.median(c[i][1] for c in ok) for i in range(n)]
        label = f"{name} (lr {s['best']:.3g})"
        ax_steps.plot(steps, loss, label=label)
        step_seconds = timing.get(name, (math.nan, math.nan))[1]
        ax_secs.plot([k * step_seconds for k in steps[1:]], loss[1:], label=label)
    ax_secs.set_xscale("log")
    for ax, xlabel in ((ax_steps, "step"), (ax_secs, "seconds (step x mean step time, 1 thread; log scale)")):
        ax.axhline(summary["target"], color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlabel=xlabel, ylabel="training loss (cross-entropy, log scale)", yscale="log")
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g") if high < 10 * low
                                     else matplotlib.ticker.NullFormatter())  # label 2, 3, ... only within a decade
    ax_steps.set_title(f"{task.name}: median over seeds, best lr each (dashed: target)", fontsize=9)
    ax_secs.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"optimizers_{task.name.replace(' ', '_')}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_runs(path: Path, quick: bool, seeds: list[int], summaries: dict, timings: dict, memory: dict) -> None:
    """Every run's curve and result, the step times and memory, as JSON (for plots or checks of your own)."""
    runs = [{"task": t, "optimizer": name, "lr": lr, "seed": seed, **result}
            for t, summary in summaries.items() for name, s in summary["optimizers"].items()
            for lr, rs in s["by_lr"].items() for seed, result in enumerate(rs)]
    path.write_text(json.dumps({"quick": quick, "seeds": seeds, "runs": runs, "step_seconds_median_mean": timings,
                                "memory_mb": memory, "targets": {t: summary["target"] for t, summary in
                                                                 summaries.items()}}, indent=0))


def load_runs(path: Path) -> tuple:
    """What `save_runs` wrote: (quick, seeds, summaries, timings, memory)."""
    saved = json.loads(path.read_text())
    quick, seeds = saved["quick"], saved["seeds"]
    summaries = {t: summarise(make_task(t, quick), {(r["optimizer"], r["lr"], r["seed"]): r for r in saved["runs"]
                                                    if r["task"] == t}, seeds) for t in TASKS}
    timings = {t: {n: tuple(v) for n, v in saved["step_seconds_median_mean"][t].items()} for t in TASKS}
    return quick, seeds, summaries, timings, saved["memory_mb"]


def print_targets(timings: dict) -> None:
    print("\n### Per-step time targets (mean step, amortised, relative to AdamW)\n")
    print("| optimizer | target | " + " | ".join(timings) + " | met |")
    print("|---|---:|" + "---:|" * len(timings) + "---|")
    for name, entry in REGISTRY.items():
        if entry.max_step_ratio is None or not all(name in t for t in timings.values()):
            continue
        ratios = [ratio(t[name][1], t["AdamW"][1]) for t in timings.values()]
        met = "yes" if all(r <= entry.max_step_ratio for r in ratios) else "no"
        print(f"| {name} | <= {entry.max_step_ratio}x | " + " | ".join(f"{r:.2f}x" for r in ratios) + f" | {met} |")


# ------------------------------------------------------------------ main
def available_entries() -> list[str]:
    names = []
    for name, entry in REGISTRY.items():
        try:
            found = entry.resolve() is not None
        except ImportError:
            found = False
        if found:
            names.append(name)
        else:
            print(f"- skipped {name}: {entry.cls} is not importable yet")
    return names


def run_grid(names: list[str], seeds: list[int], quick: bool, workers: int) -> dict[str, dict]:
    """Every (task, optimizer, lr, seed) run, in a pool; returns the per-task summaries."""
    jobs = [(t, quick, n, lr, s) for t in reversed(TASKS) for n in reversed(names) for lr in REGISTRY[n].lrs()
            for s in seeds]  # the slow ones (the LM, Newton-CG) first, for load balance
    results, start = {}, time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
        for job, result in pool.imap_unordered(run_job, jobs):
            results[job] = result
            if len(results) % 20 == 0:
                print(f"  {len(results)}/{len(jobs)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return {t: summarise(make_task(t, quick), {(n, lr, s): r for (task, _, n, lr, s), r in results.items() if task == t},
                         seeds) for t in TASKS}


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
    """The training grid, the memory runs and the interleaved timing: (summaries, timings, memory)."""
    start = time.perf_counter()
    summaries = run_grid(available_entries(), seeds, quick, workers)
    print(f"\nTraining runs: {time.perf_counter() - start:.0f} s")
    best = best_lrs(summaries)
    lap = time.perf_counter()
    memory = measure_memory(best, quick, workers)
    print(f"Memory runs: {time.perf_counter() - lap:.0f} s")
    lap = time.perf_counter()
    timings = {t: step_times(make_task(t, quick), best[t], warmup=2 if quick else 10, repeat=6 if quick else 200)
               for t in TASKS}
    print(f"Interleaved step timing: {time.perf_counter() - lap:.0f} s")
    return summaries, timings, memory


def best_lrs(summaries: dict) -> dict[str, dict[str, float]]:
    return {t: {n: s["best"] for n, s in summaries[t]["optimizers"].items() if math.isfinite(s["score"])}
            for t in TASKS}


def report(quick: bool, seeds: list[int], summaries: dict, timings: dict, memory: dict, out: Path) -> None:
    best = best_lrs(summaries)
    for t in TASKS:
        task = make_task(t, quick)
        print_table(task, summaries[t], timings[t], memory[t], seeds)
        for n in best[t]:
            for message in collect_warnings(task, REGISTRY[n], best[t][n]):
                print(f"- {n} warns: {message}")
        print(f"\nPlot: {plot(task, summaries[t], timings[t], out)}")
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
        quick, seeds, summaries, timings, memory = load_runs(args.from_results)
    else:
        quick, seeds = args.quick, [0] if args.quick else [0, 1, 2]
        summaries, timings, memory = measure(seeds, quick, args.workers)
        save_runs(out / "optimizers_runs.json", quick, seeds, summaries, timings, memory)
    report(quick, seeds, summaries, timings, memory, out)
    print(f"\nTotal {time.perf_counter() - start:.0f} s")
    if args.quick and args.out is None:
        shutil.rmtree(out)  # quick mode leaves nothing behind
    else:
        print(f"Plots and every run's curve (optimizers_runs.json) in {out}")


if __name__ == "__main__":
    main()
