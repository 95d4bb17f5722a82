"""Scale benchmark: full-dataset curvature over many in-memory batches, hesskit against PyHessian 0.1, one run.

    python bench/scale.py            # the README table (about 11 minutes on 2 quiet CPU cores at the default sizes)
    python bench/scale.py --quick    # a tiny CNN on 4 batches of 4: checks that the script runs (well under a minute)
    python bench/scale.py --batches 64 --batch-size 8    # more data (time grows in proportion)
    python bench/scale.py --parts a --threads 1          # part (a) only, one thread per process

The model is a CNN for 3x32x32 inputs and 10 classes (conv 3-32-64-128, each 3x3 with ReLU and 2x2
max-pooling, then Linear 2048-192-10: 488,586 parameters), trained for two epochs of Adam on
synthetic CIFAR-shaped data (a smooth template per class plus pixel noise, from a fixed seed: nothing
downloads), evaluated in float32, eval mode. The data are `--batches` in-memory batches of
`--batch-size` images (default 32 of 8); the Hessian is that of the mean loss over all of them.

(a) The full-dataset top eigenvalue (`hk.eigenvalues(op, k=1, tol=1e-3, seed=0)`: Lanczos) and a
    100-product trace (`hk.trace(op, num_matvecs=100, method="hutch++", seed=0)`), for four configurations, each
    in its own fresh process: hesskit with its default cache budget (a quarter of the available RAM:
    every graph fits), with no cache (`cache_memory=0`: every batch's graph is rebuilt for every
    product), with a small budget that holds about a quarter of the batches' graphs (computed from a
    probe's measured `state_bytes` and passed explicitly), and PyHessian's dataloader mode
    (`pyhessian.hessian(model, criterion, dataloader=batches, cuda=False)`, which rebuilds every batch's
    graph for every product) with its defaults: `.eigenvalues(top_n=1)` is power iteration until the
    Rayleigh quotient changes by less than 1e-3 relative (at most 100 products), and `.trace()` is
    Hutchinson with at most 100 products that stops as soon as its running mean changes by less than
    1e-3 relative to it (a signed ratio: a negative running mean stops it at once), so it uses fewer
    products than hesskit's 100; its products and the seconds per product are printed. Every task
    starts from a fresh operator, so hesskit's times include building its cache. The eigenvalues are
    compared with a reference: Lanczos to a residual of 1e-5 * ||H||, which bounds its error.
    Memory: the resident set of the process (Linux VmRSS/VmHWM, with glibc's
    MALLOC_MMAP_THRESHOLD_=131072 so that freed tensors go back to the OS and the resident set follows
    what is live). Each worker first runs its code once on a tiny problem (so that code pages and
    library workspaces are not counted), builds the model and the data, and takes the resident set as
    its baseline; before each phase (two products, the eigenvalue, the trace) the peak is reset
    (/proc/self/clear_refs) and "peak growth" is the phase's peak minus that baseline; "left" is what
    is still resident above the baseline once the phase's operator has been freed. A probe process
    measures one batch's graph (`op.state_bytes`) and the memory of the estimators' and products' own
    vectors: the same calls on one image with no cache (the Lanczos basis; Hutch++'s blocks of 33 probe
    columns and the product's work arrays for them). The checks: peak growth <= what earlier phases
    left resident + the cached graphs (<= the budget) + one batch's graph + those vectors + 64 MiB
    (allocator slack, autograd's temporaries in a backward pass); and at most 16 MiB left resident
    once a phase's operator is freed (more is a leak).
(b) Products per second of `op @ v` on the same data with one process (2 threads, then 1 thread) and
    with two gloo processes of 1 thread each (`process_group=dist.group.WORLD`, each holding half of
    the batches; all batches cached), the same number of products each, after one untimed product that
    builds the caches; and, in float64, the two-process product against the one-process product
    (target: 1e-6 relative).
(c) On a GPU: (a)'s hesskit default against PyHessian on CUDA (peak growth of
    torch.cuda.max_memory_allocated); with two or more GPUs, (b) with NCCL.

Machine limits. All timings are wall times on whatever runs the script. Every process of (a) uses
`--threads` torch threads (default: the cores this process may use, `os.sched_getaffinity`; 1 in
quick mode). On a 2-core machine two processes of one thread each use the same two cores as one
process of two threads, so (b) measures the cost of the all-reduce and of splitting the work, not a
speed-up; with more cores (or machines) than one process can use, the processes add cores. Other
processes' load distorts the numbers badly: torch's OpenMP threads wait for each other, so with 2
threads on a loaded 2-core machine products were measured 5-30x slower than with 1 thread. The
script warns when the load average shows other work, and prints it at the start and the end. torch
has no CPU allocator statistics, so the resident set is the measure of memory; it counts pages
touched, so it moves by a few MiB with the allocator's choices.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hesskit as hk  # noqa: E402
from _rss import settle_kb, status_kb  # noqa: E402  (bench/ is the script's directory)

SLACK = 64 * 2**20  # bytes allowed above cached graphs + one graph + the estimators' vectors
LEFT = 16 * 2**20  # bytes that may stay resident once an operator is freed (allocator arenas)
RESULTS = Path(__file__).resolve().parent / "results"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _busy() -> float | None:
    """The 1-minute load average where it shows other work on half of this machine's cores or more
    (lower values are the tail of whatever ran a minute ago), else None."""
    try:
        one = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return one if one >= 0.5 * cores() else None


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ------------------------------------------------------------------ model and data
def build_cnn(channels: tuple[int, ...], hidden: int) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for cout in channels:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    side = 32 // 2 ** len(channels)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def synthetic_batches(num_batches: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CIFAR-shaped batches: a smooth random template per class (8x8, upsampled) plus pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = nn.functional.interpolate(torch.randn(10, 3, 8, 8, generator=gen), size=32, mode="bilinear")
    n = num_batches * batch_size
    y = torch.randint(0, 10, (n,), generator=gen)
    x = templates[y] + torch.randn(n, 3, 32, 32, generator=gen)
    return [(x[i : i + batch_size].clone(), y[i : i + batch_size].clone()) for i in range(0, n, batch_size)]


def make_setup(args, path: Path) -> dict:
    """Build and train the model once; save weights and data for every worker process."""
    torch.manual_seed(0)
    model = build_cnn(args.channels, args.hidden)
    batches = synthetic_batches(args.batches, args.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(args.train_epochs * len(batches)):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss = sum(nn.functional.cross_entropy(model(x), y).item() * len(y) for x, y in batches) / (args.batches * args.batch_size)
    setup = dict(state=model.state_dict(), batches=batches, channels=args.channels, hidden=args.hidden,
                 trace_products=args.trace_products, pyhessian_trace_iters=args.pyhessian_trace_iters,
                 pyhessian_eig_iters=args.pyhessian_eig_iters)
    torch.save(setup, path)
    return dict(parameters=sum(p.numel() for p in model.parameters()), loss=loss)


def load_setup(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    setup = torch.load(path, weights_only=False)
    model = build_cnn(tuple(setup["channels"]), setup["hidden"])
    model.load_state_dict(setup["state"])
    model = model.to(device=device, dtype=dtype).eval()
    batches = [(x.to(device=device, dtype=dtype), y.to(device)) for x, y in setup["batches"]]
    return model, batches, setup


# ------------------------------------------------------------------ memory
class Peak:
    """Peak memory growth of a block above a baseline (bytes): the resident set on CPU (VmHWM, reset
    through /proc/self/clear_refs; where that is refused, ru_maxrss, which only rises), or
    torch.cuda.max_memory_allocated on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM"

    def baseline(self) -> int:
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return settle_kb() * 1024

    def measure(self, fn, base: int):
        """(fn(), peak growth in bytes above `base`). Afterwards `self.left` is the growth that is still
        there once what fn built has been freed (fn keeps no operator alive: 0 up to the allocator)."""
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            self.left = self.baseline() - base
            return out, torch.cuda.max_memory_allocated() - base
        settle_kb()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            exact = True
        except OSError:
            exact, self.method = False, "ru_maxrss (not reset: an upper bound over the phases so far)"
        out = fn()
        peak = status_kb("VmHWM") * 1024 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.left = self.baseline() - base
        return out, peak - base


def mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


# ------------------------------------------------------------------ part (a): one configuration per process
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _pyhessian_counted(model, criterion, batches, device):
    import pyhessian

    h = pyhessian.hessian(model, criterion, dataloader=batches, cuda=device.startswith("cuda"))
    count = [0]
    original = h.dataloader_hv_product

    def counted(v):
        count[0] += 1
        return original(v)

    h.dataloader_hv_product = counted
    return h, count


def _warm_up(config: str, model, criterion, batches, device: str) -> None:
    """Run the configuration's code once on a tiny problem, so that code pages and library
    workspaces are not counted in its peak."""
    tiny = [(x[:2], y[:2]) for x, y in batches[:2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config == "pyhessian":
            h, _ = _pyhessian_counted(model, criterion, tiny, device)
            h.eigenvalues(top_n=1, maxIter=3)
            h.trace(maxIter=3)
        else:
            op = hk.HessianOperator(model, criterion, tiny, cache_memory=float("inf"))
            op @ torch.randn(op.shape[0], device=device)
            hk.eigenvalues(op, k=1, seed=0, max_matvecs=6)
            hk.trace(op, num_matvecs=6, method="hutch++", seed=0)
    model.zero_grad(set_to_none=True)


def worker_a(config: str, setup_path: str, budget: float | None, device: str, threads: int) -> dict:
    """One configuration of part (a) in this fresh process; returns what it measured."""
    torch.set_num_threads(threads)
    model, batches, setup = load_setup(setup_path, device)
    criterion = nn.CrossEntropyLoss()
    _warm_up(config, model, criterion, batches, device)
    peak = Peak(device)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    out: dict = {"config": config, "device": device, "threads": torch.get_num_threads()}
    base = peak.baseline()
    out["baseline_bytes"] = base

    if config == "probe":  # one batch's graph; the estimators' and products' own vectors, with (almost) no data
        one = [(batches[0][0][:1], batches[0][1][:1])]

        def vectors(task):
            op = hk.HessianOperator(model, criterion, one, cache_memory=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if task == "products":
                    return [op @ v for _ in range(2)] and 2
                if task == "eig":
                    return hk.eigenvalues(op, k=1, tol=1e-3, seed=0).num_matvecs
                return hk.trace(op, num_matvecs=setup["trace_products"], method="hutch++", seed=0).num_matvecs

        for task in ("products", "eig", "trace"):
            out[f"vectors_{task}_products"], out[f"vectors_{task}"] = peak.measure(lambda: vectors(task), base)
        op = hk.HessianOperator(model, criterion, batches, cache_memory=float("inf"))
        op @ v
        out["state_bytes"] = [op.state_bytes[i] for i in range(len(batches))]
        reference = hk.eigenvalues(op, k=1, tol=1e-5, seed=1)  # residual <= 1e-5 * ||H||: the error bound
        out.update(reference_eig=reference.values[0].item(), reference_products=reference.num_matvecs,
                   reference_converged=bool(reference.converged.all()))
        return out

    if config == "pyhessian":
        def products():
            h, count = _pyhessian_counted(model, criterion, batches, device)
            vs = [t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in h.params]), h.params)]
            for _ in range(2):
                h.dataloader_hv_product(vs)
            return count[0]

        def eig():
            torch.manual_seed(0)
            h, count = _pyhessian_counted(model, criterion, batches, device)
            values, _ = h.eigenvalues(top_n=1, maxIter=setup["pyhessian_eig_iters"])
            return values[0], count[0]

        def trace():
            torch.manual_seed(0)
            h, count = _pyhessian_counted(model, criterion, batches, device)
            samples = h.trace(maxIter=setup["pyhessian_trace_iters"])
            return sum(samples) / len(samples), count[0], None

        _, out["peak_products"] = peak.measure(products, base)
        out["left_products"] = peak.left
        ((value, count), seconds), out["peak_eig"] = peak.measure(lambda: _timed(eig, device), base)
        out.update(eig_seconds=seconds, eig_products=count, eig_value=value, left_eig=peak.left)
        ((value, count, stderr), seconds), out["peak_trace"] = peak.measure(lambda: _timed(trace, device), base)
        out.update(trace_seconds=seconds, trace_products=count, trace_value=value, trace_stderr=stderr, left_trace=peak.left)
        out["peak_method"] = peak.method
        return out

    cache = {"hesskit_default": None, "hesskit_nocache": 0, "hesskit_budget": budget}[config]

    def new_op():
        return hk.HessianOperator(model, criterion, batches, cache_memory=cache)

    def products():
        op = new_op()
        for _ in range(2):
            op @ v
        return op.budget, dict(op.state_bytes), op.cached_batches, op.cached_bytes

    def eig():
        op = new_op()
        r = hk.eigenvalues(op, k=1, tol=1e-3, seed=0)
        return r.values[0].item(), r.num_matvecs, op.cached_bytes

    def trace():
        op = new_op()
        r = hk.trace(op, num_matvecs=setup["trace_products"], method="hutch++", seed=0)
        return r.value, r.num_matvecs, r.stderr, op.cached_bytes

    (op_budget, state_bytes, cached, cached_bytes), out["peak_products"] = peak.measure(products, base)
    out.update(budget=op_budget, state_bytes=[state_bytes.get(i) for i in range(len(batches))],
               cached_batches=len(cached), cached_bytes=cached_bytes, left_products=peak.left)
    ((value, count, cached_eig), seconds), out["peak_eig"] = peak.measure(lambda: _timed(eig, device), base)
    out.update(eig_seconds=seconds, eig_products=count, eig_value=value, cached_bytes_eig=cached_eig, left_eig=peak.left)
    ((value, count, stderr, cached_tr), seconds), out["peak_trace"] = peak.measure(lambda: _timed(trace, device), base)
    out.update(trace_seconds=seconds, trace_products=count, trace_value=value, trace_stderr=stderr,
               cached_bytes_trace=cached_tr, left_trace=peak.left)
    out["peak_method"] = peak.method
    return out


def run_worker(config: str, setup_path: Path, device: str, threads: int, budget: float | None = None) -> dict | None:
    """Run `config` in a fresh process (this script with --worker) and return its result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--setup", str(setup_path),
           "--device", device, "--threads", str(threads)]
    if budget is not None:
        cmd += ["--budget", repr(float(budget))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    line = [s for s in done.stdout.splitlines() if s.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        print(f"(worker {config} on {device} failed: {done.stderr.strip().splitlines()[-3:]})")
        return None
    return json.loads(line[-1][len("RESULT "):])


NAMES = {
    "hesskit_default": "hesskit, default budget",
    "hesskit_nocache": "hesskit, no cache (cache_memory=0)",
    "hesskit_budget": "hesskit, budget of ~1/4 of the graphs",
    "pyhessian": "PyHessian 0.1 dataloader mode",
}


def part_a(setup_path: Path, device: str, configs: list[str], label: str, threads: int) -> dict:
    print(f"\n### (a) Full-dataset top eigenvalue and trace ({label}, {threads} thread{'s' if threads > 1 else ''} "
          "per process)\n", flush=True)
    probe = run_worker("probe", setup_path, device, threads)
    if probe is None:
        return {}
    graph = max(probe["state_bytes"])
    quarter = max(1, round(len(probe["state_bytes"]) / 4))
    budget = sum(probe["state_bytes"][:quarter]) + probe["state_bytes"][quarter] // 2 if quarter < len(probe["state_bytes"]) \
        else sum(probe["state_bytes"])
    results = {"probe": probe}
    for config in configs:
        if config == "pyhessian":
            try:
                import pyhessian  # noqa: F401
            except ImportError:
                print("(PyHessian is not installed: its row is skipped)")
                continue
        results[config] = run_worker(config, setup_path, device, threads, budget if config == "hesskit_budget" else None)

    print(f"One batch's graph (measured, `op.state_bytes`): {mib(graph)} MiB; all {len(probe['state_bytes'])} batches: "
          f"{mib(sum(probe['state_bytes']))} MiB. Small budget: {mib(budget)} MiB (room for {quarter} of the graphs and half of another). "
          f"Memory measure: {probe.get('peak_method', 'VmHWM' if device == 'cpu' else 'torch.cuda.max_memory_allocated')}.\n")
    ref = probe["reference_eig"]
    print(f"Reference lambda_max {ref:.6g} (Lanczos to a residual of 1e-5 * ||H||, {probe['reference_products']} products, "
          f"converged: {probe['reference_converged']}); errors are relative to it.\n")
    print("| configuration | budget MiB | graph per batch MiB | batches cached | top eigenvalue s | products | "
          "s per product | lambda_max (error) | trace s | products | s per product | trace | "
          "peak growth MiB: 2 products / eigenvalue / trace |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for config in configs:
        r = results.get(config)
        if r is None:
            continue
        hesskit = config != "pyhessian"
        sizes = [s for s in r.get("state_bytes", []) if s is not None]
        budget_text = "n/a (none)" if not hesskit else ("inf" if math.isinf(r["budget"]) else mib(r["budget"]))
        trace = f"{r['trace_value']:.4g}" + ("" if r["trace_stderr"] is None else f" ± {r['trace_stderr']:.2g}")
        print(f"| {NAMES[config]} | {budget_text} | {mib(max(sizes)) if sizes else 'not measured'} | "
              f"{r['cached_batches'] if hesskit else 0} of {len(probe['state_bytes'])} | {r['eig_seconds']:.2f} | "
              f"{r['eig_products']} | {r['eig_seconds'] / r['eig_products']:.3f} | {r['eig_value']:.6g} "
              f"({abs(r['eig_value'] - ref) / abs(ref):.1e}) | "
              f"{r['trace_seconds']:.2f} | {r['trace_products']} | {r['trace_seconds'] / r['trace_products']:.3f} | {trace} | "
              f"{mib(r['peak_products'])} / {mib(r['peak_eig'])} / {mib(r['peak_trace'])} |")

    checks = []
    default, ph = results.get("hesskit_default"), results.get("pyhessian")
    if default and ph:
        ratio = default["eig_seconds"] / ph["eig_seconds"]
        rel = abs(default["eig_value"] - ph["eig_value"]) / abs(default["eig_value"])
        print(f"\nTop eigenvalue, hesskit default / PyHessian dataloader mode: {ratio:.2f}x the wall time "
              f"({default['eig_products']} against {ph['eig_products']} products); their lambda_max differ by {rel:.1e} relative. "
              f"Target (hesskit at least as fast): {'PASS' if ratio <= 1 else 'MISS'}.")
        results["eig_time_ratio"] = ratio
        results["eig_value_rel_diff"] = rel
        checks.append(("eigenvalue time, hesskit default <= PyHessian", ratio <= 1))
    print("\nPeak memory: growth <= what earlier phases left resident + cached graphs (<= budget) + one graph + the "
          f"estimator's and products' own vectors (the same call on one image, no cache) + {mib(SLACK)} MiB; and at most "
          f"{mib(LEFT)} MiB left resident once a phase's operator is freed.\n")
    print("| configuration | phase | peak growth MiB | left by earlier phases MiB | cached MiB | budget MiB | "
          "bound: left + cached + one graph + vectors + slack, MiB | excess over left + cached + one graph MiB | result | "
          "left after the phase, operator freed, MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for config in ("hesskit_default", "hesskit_nocache", "hesskit_budget"):
        r = results.get(config)
        if r is None:
            continue
        before = 0
        for phase, cached_key, vec_key in (("2 products", "cached_bytes", "vectors_products"),
                                           ("top eigenvalue", "cached_bytes_eig", "vectors_eig"),
                                           ("trace", "cached_bytes_trace", "vectors_trace")):
            short = {"2 products": "products", "top eigenvalue": "eig", "trace": "trace"}[phase]
            grown = r["peak_" + short]
            bound = before + r[cached_key] + graph + max(probe[vec_key], 0) + SLACK
            ok = grown <= bound and r[cached_key] <= r["budget"]
            checks.append((f"{config} {phase}: peak within the bound", ok))
            budget_text = "inf" if math.isinf(r["budget"]) else mib(r["budget"])
            print(f"| {NAMES[config]} | {phase} | {mib(grown)} | {mib(before)} | {mib(r[cached_key])} | {budget_text} | "
                  f"{mib(bound)} | {mib(grown - before - r[cached_key] - graph)} | {'PASS' if ok else 'MISS'} | "
                  f"{mib(r['left_' + short])} |")
            before = max(r["left_" + short], 0)
        left = max(r["left_products"], r["left_eig"], r["left_trace"])
        checks.append((f"{config}: memory returned once the operator is freed (<= {mib(LEFT)} MiB left)", left <= LEFT))
    if ph:
        print(f"| {NAMES['pyhessian']} | 2 products / eigenvalue / trace | {mib(ph['peak_products'])} / {mib(ph['peak_eig'])} / "
              f"{mib(ph['peak_trace'])} | | 0 | n/a | | | (no budget) | {mib(ph['left_products'])} / {mib(ph['left_eig'])} / "
              f"{mib(ph['left_trace'])} |")
    print(f"\nThe estimators' and products' own vectors (peak growth of the same calls on one image, cache_memory=0): "
          f"2 products {mib(probe['vectors_products'])} MiB, top eigenvalue {mib(probe['vectors_eig'])} MiB "
          f"({probe['vectors_eig_products']} products), trace {mib(probe['vectors_trace'])} MiB "
          f"({probe['vectors_trace_products']} products, in blocks of up to 33 columns).")
    results["graph_bytes"] = graph
    results["small_budget"] = budget
    results["checks"] = checks
    return results


# ------------------------------------------------------------------ part (b): products per second over processes
def _product_rate(model, criterion, batches, v, products: int, group, device: str) -> tuple[float, int]:
    """(seconds for `products` products after one warm-up product that builds the cache, cached batches)."""
    import torch.distributed as dist

    op = hk.HessianOperator(model, criterion, batches, process_group=group)
    op @ v
    if group is not None:
        dist.barrier(group)
    _sync(device)
    start = time.perf_counter()
    for _ in range(products):
        op @ v
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, len(op.cached_batches)


def worker_b(rank: int, world: int, port: int, setup_path: str, outdir: str, products: int, backend: str) -> None:
    """One of `world` processes: its half of the batches, `products` timed products (float32), one float64 product."""
    import torch.distributed as dist

    result: dict = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        device = f"cuda:{rank}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        torch.set_num_threads(max(1, cores() // world))
        dist.init_process_group(backend, rank=rank, world_size=world)
        group = dist.group.WORLD
        model, batches, _ = load_setup(setup_path, device)
        half = len(batches) // world
        mine = batches[rank * half : (rank + 1) * half] if rank < world - 1 else batches[rank * half :]
        n = sum(p.numel() for p in model.parameters())
        v = torch.randn(n, generator=torch.Generator().manual_seed(1))
        seconds, cached = _product_rate(model, nn.CrossEntropyLoss(), mine, v.to(device), products, group, device)
        model64, batches64, _ = load_setup(setup_path, device, torch.float64)
        mine64 = batches64[rank * half : (rank + 1) * half] if rank < world - 1 else batches64[rank * half :]
        product64 = hk.HessianOperator(model64, nn.CrossEntropyLoss(), mine64, process_group=group) @ v.double().to(device)
        result = dict(seconds=seconds, batches=len(mine), cached=cached, threads=torch.get_num_threads(),
                      product64=product64.cpu())
    except Exception:  # reported by the parent
        import traceback

        result = {"crash": traceback.format_exc()}
    finally:
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.barrier()  # tear down together: a process leaving mid-collective can abort the other
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_b(setup_path: Path, products: int, device: str, backend: str, world: int) -> dict:
    import torch.multiprocessing as mp

    print(f"\n### (b) Products per second: one process against {world} {backend} processes ({device})\n", flush=True)
    model, batches, _ = load_setup(str(setup_path), device)
    criterion = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    rows = []
    saved_threads = torch.get_num_threads()
    thread_settings = [cores(), 1] if device == "cpu" and cores() > 1 else [cores()]
    for threads in thread_settings:
        torch.set_num_threads(threads)
        seconds, cached = _product_rate(model, criterion, batches, v.to(device), products, None, device)
        rows.append(dict(setting=f"hesskit, 1 process, {threads} thread{'s' if threads > 1 else ''}", processes=1,
                         threads=threads, seconds=seconds, cached=cached))
    torch.set_num_threads(saved_threads)
    model64, batches64, _ = load_setup(str(setup_path), device, torch.float64)
    reference = (hk.HessianOperator(model64, criterion, batches64) @ v.double().to(device)).cpu()
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(worker_b, args=(world, _free_port(), str(setup_path), outdir, products, backend),
                           nprocs=world, join=True, start_method="spawn")
        ranks = [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    out: dict = {"rows": rows, "products": products, "backend": backend, "world": world}
    crashed = [r.get("crash") for r in ranks if "crash" in r]
    if crashed:
        print(f"(the {world}-process run failed:\n{crashed[0]})")
        out["crash"] = crashed[0]
    else:
        seconds = max(r["seconds"] for r in ranks)
        rows.append(dict(setting=f"hesskit, {world} {backend} processes, {ranks[0]['threads']} thread"
                                 f"{'s' if ranks[0]['threads'] > 1 else ''} each", processes=world,
                         threads=ranks[0]["threads"], seconds=seconds, cached=sum(r["cached"] for r in ranks)))
        rel = max(((r["product64"] - reference).norm() / reference.norm()).item() for r in ranks)
        same = all(torch.equal(r["product64"], ranks[0]["product64"]) for r in ranks)
        out.update(float64_rel_diff=rel, ranks_identical=same)
    print(f"{len(batches)} batches of {len(batches[0][1])}, {products} timed products of `op @ v` each, after one that "
          f"builds the cache (all batches cached).\n")
    print("| setting | processes x threads | products | seconds | products per second | rate / 1 process, "
          f"{thread_settings[0]} threads |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0]["seconds"]
    for row in rows:
        row["rate"] = products / row["seconds"]
        row["ratio"] = base / row["seconds"]
        print(f"| {row['setting']} | {row['processes']} x {row['threads']} | {products} | {row['seconds']:.2f} | "
              f"{row['rate']:.3f} | {row['ratio']:.2f} |")
    if "float64_rel_diff" in out:
        ok = out["float64_rel_diff"] <= 1e-6
        print(f"\nfloat64, {world} processes against 1 process on all the batches: relative difference "
              f"{out['float64_rel_diff']:.1e} (target 1e-6: {'PASS' if ok else 'MISS'}); every process got the same "
              f"product to the bit: {out['ranks_identical']}.")
        out["checks"] = [("float64 agreement 1e-6", ok)]
    return out


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CNN on 4 batches of 4: checks that the script runs")
    parser.add_argument("--batches", type=int, default=None, help="in-memory batches (default 32; quick 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 8; quick 4)")
    parser.add_argument("--products", type=int, default=None, help="timed products per setting in (b) (default 20; quick 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process in (a) (default: the cores available; quick 1)")
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. 'a' or 'bc' (default abc)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to save the numbers (default bench/results/scale.json; none in quick mode)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_a(args.worker, args.setup, args.budget, args.device, args.threads or cores())
        print("RESULT " + json.dumps(result))
        return

    quick = args.quick
    args.batches = args.batches or (4 if quick else 32)
    args.batch_size = args.batch_size or (4 if quick else 8)
    args.products = args.products or (3 if quick else 20)
    args.channels, args.hidden = ((4, 8, 8), 16) if quick else ((32, 64, 128), 192)
    args.train_epochs = 1 if quick else 2
    args.trace_products = 30 if quick else 100
    args.pyhessian_trace_iters = 30 if quick else 100  # PyHessian's default maxIter is 100
    args.pyhessian_eig_iters = 30 if quick else 100
    args.threads = args.threads or (1 if quick else cores())
    torch.set_num_threads(cores())
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {cores()} cores, float32; load average at start: {loadavg()}")
    busy = _busy()
    if busy and args.threads > 1:
        print(f"WARNING: the load average ({busy:.1f}) shows other processes on these {cores()} cores. With several "
              "threads per process, torch's OpenMP threads then wait for each other's descheduled peers: products "
              "were measured 5-30x slower with 2 threads than with 1 on a loaded 2-core machine. Run on a quiet "
              "machine, or pass --threads 1.")
    results: dict = {"torch": torch.__version__, "cores": cores(), "threads_a": args.threads, "quick": quick,
                     "load_start": loadavg()}
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        setup_path = Path(tmp) / "setup.pt"
        info = make_setup(args, setup_path)
        print(f"CNN {args.channels} + {args.hidden} hidden: {info['parameters']:,} parameters; {args.batches} batches of "
              f"{args.batch_size} synthetic 3x32x32 images ({args.batches * args.batch_size} samples); mean loss after "
              f"{args.train_epochs} epoch(s) of Adam {info['loss']:.3f}")
        results.update(parameters=info["parameters"], batches=args.batches, batch_size=args.batch_size, loss=info["loss"])
        if "a" in args.parts:
            results["a"] = part_a(setup_path, "cpu", list(NAMES), "CPU", args.threads)
            checks += results["a"].get("checks", [])
        if "b" in args.parts:
            results["b"] = part_b(setup_path, args.products, "cpu", "gloo", 2)
            checks += results["b"].get("checks", [])
        if "c" in args.parts:
            if torch.cuda.is_available() and torch.cuda.device_count() >= 1:
                print(f"\nGPU: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)")
                results["c_a"] = part_a(setup_path, "cuda", ["hesskit_default", "pyhessian"], "CUDA", args.threads)
                checks += [(f"CUDA: {name}", ok) for name, ok in results["c_a"].get("checks", [])]
                if torch.cuda.device_count() >= 2:
                    results["c_b"] = part_b(setup_path, args.products, "cuda", "nccl", 2)
                    checks += [(f"CUDA: {name}", ok) for name, ok in results["c_b"].get("checks", [])]
                else:
                    print("\nOne GPU: the NCCL part of (c) needs two, not measured.")
            else:
                print("\nno GPU here: part (c) not measured")
    results["load_end"] = loadavg()
    results["seconds"] = time.perf_counter() - start
    results["checks"] = checks
    print(f"\nChecks: {sum(ok for _, ok in checks)} of {len(checks)} PASS"
          + "".join(f"\n  MISS: {name}" for name, ok in checks if not ok))
    print(f"Load average at end: {loadavg()}; total {results['seconds']:.0f} s")
    path = args.json or (None if quick else RESULTS / "scale.json")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str))
        print(f"Numbers saved to {path}")


if __name__ == "__main__":
    main()
