"""Curvature benchmark: hesskit against PyHessian 0.1 and hessian-eigenthings 1.0.0a5, one run.

    python bench/curvature.py            # the README table (a few minutes on 2 CPU cores)
    python bench/curvature.py --quick    # tiny models, checks that the script runs

For each model it prints (1) the cost of one product relative to a gradient, and (2) top-5
eigenvalues and the trace: wall time, products, time outside products, and the error against
the exact answer; and, for the ~6k CNN at five points of training (0 to 1,000 Adam steps, two
seeds), the products PyHessian and hesskit need for the top-5 eigenvalues to 1e-3, which set the
ratio of their wall times. Exact answers: eigenvalues of the dense Hessian for the ~6k model; for the
121k model and the table across training a float64 Lanczos run at tol 1e-10 (its residuals bound the
error by 1e-10 * ||H||) and, for the trace, a 3,000-product Hutch++ estimate (given with its standard error).

curvlinops 3.0.1 (installed with --no-deps: its backpack-for-pytorch dependency pulls torchvision,
which has no CPU build for torch 2.13 here; the Hessian and GGN operators and the estimators do not
need it): trace and diagonal at equal products, top-5 eigenvalues by its scipy eigsh route, and its
Hessian on a LayerNorm model against autograd. Without curvlinops these rows are skipped.

Which estimator should be the default: `choose_defaults` measures Hutchinson, Hutch++ and XTrace
(and Hutchinson and XDiag for the diagonal) on three dense float64 matrices of small models, a
spiked, a flat indefinite and a low-rank one, at 30, 99 and 300 products over 50 seeds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hesskit as hk  # noqa: E402
from hesskit.experiments.tasks import fit_classifier  # noqa: E402

ROWS: list[list[str]] = []


def timed_interleaved(fns: dict[str, Callable], repeat: int) -> dict[str, float]:
    """Median seconds per call, the candidates taking turns so that machine noise hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_run(fn: Callable, repeat: int):
    """Run fn() `repeat` times; return the result of the run with the median wall time."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - start, out))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def trained_model(model: nn.Module, x, y, steps: int, seed: int = 0) -> nn.Module:
    """A few full-batch Adam steps (lr 3e-3, `fit_classifier`) so the spectrum looks like a real
    network's (outliers above a bulk), in eval mode. The global generator is reseeded with `seed`
    first: the tables after it draw from it."""
    torch.manual_seed(seed)
    return fit_classifier(model, (x, y), steps, 3e-3).eval()


# ------------------------------------------------------------------ estimator defaults
def default_matrices(data, criterion, quick: bool) -> dict[str, torch.Tensor]:
    """Three dense float64 curvature matrices of small models, each a kind of spectrum the
    estimators meet: spiked (a trained CNN's Hessian: a few outliers above a bulk), flat and
    indefinite (a BatchNorm CNN's Hessian at initialisation, eval mode) and low-rank (the GGN of
    an MLP on 8 samples: rank at most 8 x 9 = 72)."""
    x, y = data
    torch.manual_seed(0)
    spiked = trained_model(hk.models.SmallCNN((2, 4) if quick else (8, 16)), x, y, steps=20 if quick else 300)
    torch.manual_seed(0)
    flat = hk.models.BatchNormCNN((2, 4) if quick else (8, 16)).eval()
    torch.manual_seed(0)
    low = hk.models.MLP(hidden=(4,) if quick else (32,))
    x64 = x.double()
    out = {}
    cases = [("spiked (trained SmallCNN Hessian)", spiked, (x64, y), hk.HessianOperator),
             ("flat indefinite (BatchNormCNN Hessian, init)", flat, (x64, y), hk.HessianOperator),
             ("low-rank (MLP GGN, 8 samples)", low, (x64[:8], y[:8]), hk.GGNOperator)]
    for name, model, batch, kind in cases:
        M = kind(copy.deepcopy(model).double(), criterion, batch).dense()
        out[f"{name}, n = {M.shape[0]:,}"] = (M + M.T) / 2
    return out


def choose_defaults(matrices: dict[str, torch.Tensor], budgets=(30, 99, 300), seeds: int = 50) -> dict[str, dict]:
    """RMS relative error over `seeds` seeds of each trace method (and each diagonal method) at
    each budget, on dense matrices (products are matmuls, so this is cheap), and each method's
    error over the best one's in the same cell. Errors below 1e-12 count as 1e-12 in the ratios
    (an exact answer, up to rounding)."""
    floor = 1e-12

    def rms(errors):
        return (sum(e * e for e in errors) / len(errors)) ** 0.5

    trace_rows, diag_rows = {}, {}
    for name, M in matrices.items():
        exact_tr, exact_diag = M.trace().item(), M.diagonal()
        for m in budgets:
            trace_rows[(name, m)] = {
                method: rms([abs(hk.trace(M, m, method=method, seed=s).value - exact_tr) / abs(exact_tr)
                             for s in range(seeds)]) for method in ("hutchinson", "hutch++", "xtrace")}
            diag_rows[(name, m)] = {
                method: rms([((hk.diagonal(M, m, method=method, seed=s).value - exact_diag).norm()
                              / exact_diag.norm()).item() for s in range(seeds)]) for method in ("hutchinson", "xdiag")}

    def table(title, rows, methods):
        print(f"\n### {title}\n")
        print("| matrix | products | " + " | ".join(methods) + " | best |")
        print("|---|---:|" + "---:|" * (len(methods) + 1))
        worst = {meth: 0.0 for meth in methods}
        for (name, m), cell in rows.items():
            best_name = min(cell, key=cell.get)
            best = max(cell[best_name], floor)
            parts = []
            for meth in methods:
                ratio = max(cell[meth], floor) / best
                worst[meth] = max(worst[meth], ratio)
                parts.append(f"{cell[meth]:.2e} ({ratio:.2f}x)")
            print(f"| {name} | {m} | " + " | ".join(parts) + f" | {best_name} |")
        print("\nWorst ratio to the best, over all cells: " + ", ".join(f"{k} {v:.2f}x" for k, v in worst.items()))
        return worst

    worst_trace = table(f"Trace estimators: RMS relative error over {seeds} seeds (ratio to the best in the row)",
                        trace_rows, ("hutchinson", "hutch++", "xtrace"))
    worst_diag = table(f"Diagonal estimators: RMS of ||d - diag||/||diag|| over {seeds} seeds (ratio to the best)",
                       diag_rows, ("hutchinson", "xdiag"))
    return {"trace": worst_trace, "diagonal": worst_diag}


def curvlinops_dense_table(matrices: dict[str, torch.Tensor], seeds: int = 200) -> None:
    """hesskit against curvlinops 3.0.1 on the dense matrices of `choose_defaults` (curvlinops'
    estimators take a tensor too), many seeds: RMS relative error of each library's Hutch++ (99
    products), XTrace, Hutchinson's diagonal and XDiag (100), their ratio, and the ratio's 95%
    bootstrap interval over seeds (the libraries draw independent probes, so the interval is what
    "no worse" can be judged by)."""
    import curvlinops
    import numpy as np

    rng = np.random.default_rng(0)

    def rel(value, exact):
        value = torch.as_tensor(value, dtype=torch.float64)
        return ((value - exact).norm() / exact.norm()).item()

    methods = [("trace", "Hutch++", 99, lambda M, s: hk.trace(M, 99, method="hutch++", seed=s).value,
                lambda M: curvlinops.hutchpp_trace(M, 99)),
               ("trace", "XTrace", 100, lambda M, s: hk.trace(M, 100, method="xtrace", seed=s).value,
                lambda M: curvlinops.xtrace(M, 100)),
               ("diagonal", "Hutchinson", 100, lambda M, s: hk.diagonal(M, 100, method="hutchinson", seed=s).value,
                lambda M: curvlinops.hutchinson_diag(M, 100)),
               ("diagonal", "XDiag", 100, lambda M, s: hk.diagonal(M, 100, method="xdiag", seed=s).value,
                lambda M: curvlinops.xdiag(M, 100))]
    print(f"\n### hesskit and curvlinops 3.0.1 on the dense matrices: RMS relative error over {seeds} seeds\n")
    print("| matrix | task | method | products | hesskit | curvlinops | hesskit / curvlinops (95% bootstrap) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, M in matrices.items():
        for task, method, m, ours, theirs in methods:
            exact = torch.as_tensor(M.trace() if task == "trace" else M.diagonal(), dtype=torch.float64)
            a = np.array([rel(ours(M, s), exact) for s in range(seeds)])
            b = []
            for s in range(seeds):
                torch.manual_seed(s)
                b.append(rel(theirs(M), exact))
            b = np.array(b)
            ratio = np.sqrt((a**2).mean() / (b**2).mean())
            boot = [np.sqrt((rng.choice(a, seeds) ** 2).mean() / (rng.choice(b, seeds) ** 2).mean()) for _ in range(2000)]
            lo, hi = np.percentile(boot, [2.5, 97.5])
            print(f"| {name} | {task} | {method} | {m} | {np.sqrt((a**2).mean()):.2e} | {np.sqrt((b**2).mean()):.2e} "
                  f"| {ratio:.2f} ({lo:.2f}-{hi:.2f}) |")


# ------------------------------------------------------------------ block Lanczos
def block_lanczos_table(data, criterion, quick: bool) -> None:
    """Block Lanczos against single-vector Lanczos: `hk.eigenvalues` with block_size 1, 2, 4, 8
    and the default (None), on spectra with and without repeated or clustered eigenvalues.

    Per run: products, median seconds (the block sizes take turns, `timed_interleaved`), the
    largest |theta_i - lambda_i| / ||A|| against the dense eigenvalues, whether every pair met
    tol, and how many copies of the repeated eigenvalue came back: the longest run of wanted exact
    eigenvalues with gaps <= 1e-4 ||A||, a copy counted when a returned value lies within
    tol * ||A|| of that run. Cases: dense float64 Q diag(lambda) Q^T with known spectra (products
    are matmuls, so their seconds are mostly the algorithms' own), notebook 02's MLP Hessian (the
    10 smallest, float64, tol 1e-6 as there), the GGN of an MLP on 8 samples (rank <= 72: a
    many-fold zero) and a trained SmallCNN's Hessian (top 5, float32, as in the estimator table).
    """
    import warnings

    n, repeat = (200, 1) if quick else (1000, 3)
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen)).Q
    bulk = 0.02 * torch.randn(n - 7, dtype=torch.float64, generator=gen)  # near 0, as a network Hessian's
    edge = 0.9 - 0.5 * torch.rand(n - 5, dtype=torch.float64, generator=gen)
    five, outliers = torch.ones(5, dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    cluster = 1 - 2.5e-5 * torch.arange(5, dtype=torch.float64)  # 1, 1 - 2.5e-5, ..., 1 - 1e-4
    spectra = {"5-fold top eigenvalue above a bulk near 0": torch.cat([five, outliers, bulk]),
               "5-fold top eigenvalue, a dense bulk 0.1 below": torch.cat([five, edge]),
               "5 top eigenvalues within 1e-4 (relative)": torch.cat([cluster, outliers, bulk]),
               "spread, no cluster (0.7^i)": torch.cat([0.7 ** torch.arange(7, dtype=torch.float64), bulk])}
    cases = [(f"{name}, n = {n:,}, top 6", (Q * lam) @ Q.T, None, 6, "largest", 1e-3) for name, lam in spectra.items()]
    (xd, yd), _ = hk.data.digits(flatten=True)
    torch.manual_seed(0)  # notebook 02's model: a 64-16-10 tanh MLP, 300 full-batch Adam steps at lr 1e-2
    mlp = fit_classifier(hk.models.MLP(64, (8,) if quick else (16,), 10, activation="tanh").double(),
                         (xd.double(), yd), 60 if quick else 300, 1e-2)
    m = 256 if quick else 512
    cases.append(("notebook 02's MLP Hessian, 10 smallest, tol 1e-6",
                  hk.HessianOperator(mlp, criterion, (xd[:m].double(), yd[:m])), None, 10, "smallest", 1e-6))
    x, y = data
    torch.manual_seed(0)
    low = hk.models.MLP(hidden=(4,) if quick else (32,)).double()
    cases.append(("MLP GGN on 8 samples (rank <= 72), 5 smallest",
                  hk.GGNOperator(low, criterion, (x[:8].double(), y[:8])), None, 5, "smallest", 1e-3))
    cnn = trained_model(hk.models.SmallCNN((4, 8) if quick else (16, 32)), x, y, steps=20 if quick else 300)
    dense = hk.HessianOperator(copy.deepcopy(cnn).double(), criterion, (x.double(), y)).dense()  # the exact answer's
    cases.append(("trained SmallCNN Hessian (float32), top 5", hk.HessianOperator(cnn, criterion, data), dense, 5,
                  "largest", 1e-3))

    print("\n### Block Lanczos against single-vector Lanczos (seed 0)\n")
    print(f"Median seconds over {repeat} interleaved runs; error: max |theta_i - lambda_i| / ||A||; copies: of the "
          "longest run of wanted eigenvalues within 1e-4 ||A|| of each other\n")
    print("| case | block size | products | seconds | error | converged | copies found |")
    print("|---|---|---:|---:|---:|---|---:|")
    verdicts = []
    for name, op, dense, k, which, tol in cases:
        exact = torch.linalg.eigvalsh(op if isinstance(op, torch.Tensor) else op.dense() if dense is None else dense)
        want = exact.flip(0)[:k] if which == "largest" else exact[:k]
        anorm = exact.abs().max().item()
        lo, hi, start = 0, 1, 0  # the longest run of wanted eigenvalues within 1e-4 ||A|| of their neighbours
        for i in range(1, k):
            start = start if abs(want[i] - want[i - 1]) <= 1e-4 * anorm else i
            lo, hi = (start, i + 1) if i + 1 - start > hi - lo else (lo, hi)
        group = want[lo:hi]
        runs = {b: (lambda b=b: hk.eigenvalues(op, k=k, which=which, tol=tol, seed=0, block_size=b))
                for b in (1, 2, 4, 8, None)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unconverged runs show as such in the table
            results = {b: fn() for b, fn in runs.items()}
            seconds = timed_interleaved(runs, repeat)
        all_found = {}
        for b, r in results.items():
            values = r.values.double().cpu()
            near = int(((values >= group.min() - tol * anorm) & (values <= group.max() + tol * anorm)).sum())
            near = min(near, hi - lo)
            all_found[b] = near == hi - lo and bool(r.converged.all())
            print(f"| {name} | {'1 (single vector)' if b == 1 else b or 'default'} | {r.num_matvecs} | "
                  f"{seconds[b]:.3f} | {(values - want).abs().max().item() / anorm:.1e} | {bool(r.converged.all())} | "
                  f"{f'{near} of {hi - lo}' if hi - lo > 1 else 'no repeat'} |")
        good = [b for b in (2, 4, 8) if all_found[b]]
        fewest = min(good, key=lambda b: results[b].num_matvecs, default=None)
        fastest = min(good, key=lambda b: seconds[b], default=None)
        verdicts.append(f"- {name}: single vector {results[1].num_matvecs} products, {seconds[1]:.3f} s"
                        + ("" if all_found[1] else " (misses copies)") + "; blocks that find every copy: "
                        + (f"fewest products b = {fewest} ({results[fewest].num_matvecs}), fastest b = {fastest} "
                           f"({seconds[fastest]:.3f} s)" if good else "none")
                        + f"; the default ran {results[None].method}" + ("" if all_found[None] else " (misses copies)"))
    print("\n" + "\n".join(verdicts))


# ------------------------------------------------------------------ competitors
def pyhessian_run(model, criterion, data, task: str, **kwargs):
    import pyhessian

    module = sys.modules["pyhessian.hessian"]
    count = [0]
    original = module.hessian_vector_product

    def counted(*args):
        count[0] += 1
        return original(*args)

    module.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        h = pyhessian.hessian(copy.deepcopy(model), criterion, data=data, cuda=False)
        if task == "eig":
            values, _ = h.eigenvalues(top_n=5, **kwargs)
            result = sorted(values, reverse=True)
        else:
            samples = h.trace(**kwargs)
            result = sum(samples) / len(samples)
        return result, time.perf_counter() - start, count[0]
    finally:
        module.hessian_vector_product = original


def eigenthings_run(model, criterion, data, task: str, **kwargs):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [data], he.supervised_loss(criterion))
    count = [0]
    original = op.matvec

    def counted(v):
        count[0] += 1
        return original(v)

    op.matvec = counted
    start = time.perf_counter()
    if task == "eig":
        result = he.lanczos(op, k=5, which="LA", seed=0, **kwargs).eigenvalues.sort(descending=True).values.tolist()
    else:
        result = he.trace(op, seed=0, **kwargs).estimate
    return result, time.perf_counter() - start, count[0]


# ------------------------------------------------------------------ curvlinops 3.0.1
def curvlinops_available() -> bool:
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        print("\ncurvlinops not installed: rows skipped")
        return False
    return True


def curvlinops_hessian(model, criterion, data):
    import curvlinops

    params = [p for p in model.parameters() if p.requires_grad]
    return curvlinops.HessianLinearOperator(model, criterion, params, [data])


def equal_products_table(label, model, criterion, data, exact_trace, exact_diag, seeds: int) -> None:
    """Trace and diagonal at equal products, hesskit against curvlinops 3.0.1 on the same Hessian:
    RMS relative error over `seeds` seeds (curvlinops draws its probes from the global RNG, seeded
    with torch.manual_seed). Hutch++ runs 99 products (curvlinops needs a multiple of 3), XTrace,
    XDiag and Hutchinson's diagonal 100 (even)."""
    import curvlinops

    cl = curvlinops_hessian(model, criterion, data)
    op = hk.HessianOperator(model, criterion, data)

    def rms(errors):
        return (sum(e * e for e in errors) / len(errors)) ** 0.5

    def tr_err(value):
        return abs(float(value) - exact_trace) / abs(exact_trace)

    def diag_err(value):
        return ((value.double() - exact_diag).norm() / exact_diag.norm()).item()

    def cl_run(fn, seed):
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    rows = []
    for name, m, ours, theirs in [
        ("Hutch++", 99, lambda s: hk.trace(op, 99, method="hutch++", seed=s),
         lambda: curvlinops.hutchpp_trace(cl, 99)),
        ("XTrace", 100, lambda s: hk.trace(op, 100, method="xtrace", seed=s),
         lambda: curvlinops.xtrace(cl, 100)),
    ]:
        results = [ours(s) for s in range(seeds)]
        rows.append(("trace", f"hesskit {name}", m, statistics.median(r.wall_time for r in results),
                     rms([tr_err(r.value) for r in results])))
        runs = [cl_run(theirs, s) for s in range(seeds)]
        rows.append(("trace", f"curvlinops {name}", m, statistics.median(t for _, t in runs),
                     rms([tr_err(v) for v, _ in runs])))
    if exact_diag is not None:
        for name, method, theirs in [("Hutchinson", "hutchinson", lambda: curvlinops.hutchinson_diag(cl, 100)),
                                     ("XDiag", "xdiag", lambda: curvlinops.xdiag(cl, 100))]:
            results = [hk.diagonal(op, 100, method=method, seed=s) for s in range(seeds)]
            rows.append(("diagonal", f"hesskit {name}", 100, statistics.median(r.wall_time for r in results),
                         rms([diag_err(r.value) for r in results])))
            runs = [cl_run(theirs, s) for s in range(seeds)]
            rows.append(("diagonal", f"curvlinops {name}", 100, statistics.median(t for _, t in runs),
                         rms([diag_err(v) for v, _ in runs])))
    print(f"\n### hesskit and curvlinops 3.0.1 at equal products: {label}\n")
    print(f"RMS relative error over {seeds} seeds (diagonal: ||d - diag(H)|| / ||diag(H)||); median seconds\n")
    print("| task | library / method | products | seconds | RMS relative error |")
    print("|---|---|---:|---:|---:|")
    for task, name, m, seconds, err in rows:
        print(f"| {task} | {name} | {m} | {seconds:.2f} | {err:.1e} |")


def curvlinops_eigsh_row(model, criterion, data, exact_eigs, tol: float = 1e-3):
    """Top-5 eigenvalues by curvlinops' route: its operator wrapped for scipy, then scipy's eigsh
    (ARPACK, which='LA', tol) with the products counted. Returns a row of `estimator_table`."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    A = curvlinops_hessian(model, criterion, data).to_scipy()
    count = [0]

    def matmat(X):
        X = np.asarray(X)
        count[0] += 1 if X.ndim == 1 else X.shape[1]
        return A @ X

    counted = LinearOperator(A.shape, matvec=matmat, matmat=matmat, dtype=A.dtype)
    start = time.perf_counter()
    values = eigsh(counted, k=5, which="LA", tol=tol, v0=np.ones(A.shape[0], dtype=A.dtype),
                   return_eigenvectors=False)
    seconds = time.perf_counter() - start
    values = sorted(values.tolist(), reverse=True)
    err = max(abs(a - b) / abs(b) for a, b in zip(values, exact_eigs))
    name = f"curvlinops 3.0.1 + scipy eigsh (which='LA', tol={tol:g})"
    return ("top-5 eigenvalues", name, seconds, count[0], None, err)


def layernorm_check(quick: bool) -> None:
    """curvlinops 3.0.1's Hessian on a LayerNorm model (TinyTransformer, float64) against the dense
    Hessian by autograd double backward (column by column); hesskit's against the same reference."""
    torch.manual_seed(0)
    model = hk.models.TinyTransformer(vocab=4, dim=4 if quick else 8, heads=2, mlp_ratio=1).double()
    tokens = torch.randint(0, 4, (16, 5))
    data = (tokens, torch.randint(0, 4, (16,)))
    criterion = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    grads = torch.autograd.grad(criterion(model(tokens), data[1]), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    reference = torch.stack([torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params,
                                                                                    retain_graph=True)])
                             for i in range(n)])
    ours = hk.HessianOperator(model, criterion, data).dense()
    theirs = curvlinops_hessian(model, criterion, data) @ torch.eye(n, dtype=torch.float64)
    rel = lambda M: ((M - reference).norm() / reference.norm()).item()  # noqa: E731
    print(f"\n### LayerNorm: curvlinops 3.0.1's Hessian against autograd (TinyTransformer, n = {n}, float64)\n")
    print("| Hessian | relative error (Frobenius) against autograd double backward |")
    print("|---|---:|")
    print(f"| hesskit HessianOperator | {rel(ours):.1e} |")
    print(f"| curvlinops 3.0.1 HessianLinearOperator | {rel(theirs):.1e} |")


# ------------------------------------------------------------------ sections
def product_costs(label, model, criterion, data, repeat):
    x, y = data
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    v = torch.randn(n)
    V = torch.randn(n, 16)
    cached = hk.HessianOperator(model, criterion, data)
    rebuilt = hk.HessianOperator(model, criterion, data, cache_memory=0)
    ggn = hk.GGNOperator(model, criterion, data)
    ef = hk.EmpiricalFisherOperator(model, criterion, data)
    loop = hk.HessianOperator(model, criterion, data, batched_products=False)
    vmapped = hk.HessianOperator(model, criterion, data, batched_products=True)
    fns = {
        "gradient (reference)": lambda: torch.autograd.grad(criterion(model(x), y), params),
        "hesskit HVP, graph reused": lambda: cached @ v,
        "hesskit HVP, graph rebuilt": lambda: rebuilt @ v,
        "hesskit GGN product": lambda: ggn @ v,
        "hesskit EF product (per-sample grads cached)": lambda: ef @ v,
        "hesskit op @ V, 16 columns, loop (per column)": lambda: loop @ V,
        "hesskit op @ V, 16 columns, vmap (per column)": lambda: vmapped @ V,
    }
    try:
        import pyhessian

        h = pyhessian.hessian(copy.deepcopy(model), criterion, data=data, cuda=False)
        vs = [torch.randn_like(p) for p in h.params]
        module = sys.modules["pyhessian.hessian"]
        fns["PyHessian HVP (graph kept)"] = lambda: module.hessian_vector_product(h.gradsH, h.params, vs)
    except ImportError:
        pass
    try:
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [data], he.supervised_loss(criterion))
        fns["hessian-eigenthings HVP (graph rebuilt)"] = lambda: op.matvec(v)
    except ImportError:
        pass
    seconds = timed_interleaved(fns, repeat)
    for name in seconds:
        if "16 columns" in name:
            seconds[name] /= 16
    grad = seconds["gradient (reference)"]
    rows = list(seconds.items())
    print(f"\n### Product cost: {label} (n = {n:,}, batch {len(y)})\n")
    print("| product | ms | x gradient |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / grad:.2f} |")


def estimator_table(label, model, criterion, data, exact_eigs, exact_trace, trace_note, tuned_settings, repeat):
    def rel_error(values):
        return max(abs(a - b) / abs(b) for a, b in zip(values, exact_eigs))

    rows = []
    seconds, ours = median_run(lambda: hk.eigenvalues(hk.HessianOperator(model, criterion, data), k=5, seed=0), repeat)
    rows.append(("top-5 eigenvalues", "hesskit Lanczos (tol=1e-3, default)", seconds,
                 ours.num_matvecs, ours.overhead_time, rel_error(ours.values.tolist())))
    for name, fn, settings in tuned_settings:
        first_ok = None
        for i, kwargs in enumerate(settings):
            _, (values, seconds, count) = median_run(lambda: fn(model, criterion, data, "eig", **kwargs), repeat)
            err = rel_error(values)
            if i == 0:
                rows.append(("top-5 eigenvalues", f"{name} (default: {kwargs})", seconds, count, None, err))
            if err <= 1e-3:
                first_ok = (kwargs, seconds, count, err)
                break
        if first_ok is None:
            rows.append(("top-5 eigenvalues", f"{name}: no setting tried reached 1e-3", None, None, None, None))
        elif first_ok[0] != settings[0]:
            kwargs, seconds, count, err = first_ok
            rows.append(("top-5 eigenvalues", f"{name} (tuned to reach 1e-3: {kwargs})", seconds, count, None, err))
    try:
        rows.append(curvlinops_eigsh_row(model, criterion, data, exact_eigs))
    except ImportError:
        pass
    for setting, kwargs in [("XTrace, the default", {}), ("Hutch++", {"method": "hutch++"})]:
        _, tr = median_run(lambda: hk.trace(hk.HessianOperator(model, criterion, data), num_matvecs=99, seed=0,
                                            **kwargs), repeat)
        rows.append(("trace", f"hesskit {setting} (99 products, stderr {tr.stderr:.3g})", tr.wall_time,
                     tr.num_matvecs, tr.overhead_time, abs(tr.value - exact_trace) / abs(exact_trace)))
    for name, fn, kwargs in [("PyHessian 0.1 (defaults: tol=1e-3, maxIter=100)", pyhessian_run, {}),
                             ("hessian-eigenthings Hutch++ (num_matvecs=99)", eigenthings_run, {"num_matvecs": 99})]:
        try:
            _, (value, seconds, count) = median_run(lambda: fn(model, criterion, data, "trace", **kwargs), repeat)
            rows.append(("trace", name, seconds, count, None, abs(value - exact_trace) / abs(exact_trace)))
        except ImportError:
            pass
    print(f"\n### Estimators: {label}\n")
    print(f"Exact top-5: {', '.join(f'{e:.4g}' for e in exact_eigs)}; trace {exact_trace:.5g} {trace_note}\n")
    print("| task | library / setting | seconds | products | s outside products | relative error |")
    print("|---|---|---:|---:|---:|---:|")
    for task, name, seconds, count, overhead, err in rows:
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        print(f"| {task} | {name} | {fmt(seconds, '.2f')} | {fmt(count, 'd')} | {fmt(overhead, '.3f')} | {fmt(err, '.1e')} |")
    return rows


def eigen_products_across_training(channels, criterion, data, steps_list, seeds, pyhessian_tols) -> None:
    """Products each method needs for the top-5 eigenvalues to 1e-3, at several points of training.

    The ratio of products is what decides the wall-time ratio (both libraries pay the same per
    product): it depends on the spectrum, not on the implementation. The reference is a float64
    Lanczos run at tol 1e-10 (top 8, of which the top 5 are compared).
    """
    print(f"\n### Top-5 eigenvalues across training: products to reach 1e-3 (SmallCNN{channels}, batch {len(data[1])})\n")
    print("| Adam steps | seed | top 6 eigenvalues | hesskit Lanczos (tol=1e-3): products, error "
          "| PyHessian tuned: tol, products, error | PyHessian / hesskit products |")
    print("|---:|---:|---|---|---|---:|")
    for steps in steps_list:
        for seed in seeds:
            torch.manual_seed(seed)
            model = trained_model(hk.models.SmallCNN(channels), *data, steps=steps, seed=seed)
            model64, data64 = copy.deepcopy(model).double(), (data[0].double(), data[1])
            reference = hk.eigenvalues(hk.HessianOperator(model64, criterion, data64), k=8, tol=1e-10, seed=1).values
            exact = reference[:5].tolist()
            ours = hk.eigenvalues(hk.HessianOperator(model, criterion, data), k=5, seed=0)
            err = max(abs(a - b) / abs(b) for a, b in zip(ours.values.tolist(), exact))
            tuned = "none of the tols reached 1e-3"
            ratio = "n/a"
            for kwargs in pyhessian_tols:
                values, _, count = pyhessian_run(model, criterion, data, "eig", **kwargs)
                ph_err = max(abs(a - b) / abs(b) for a, b in zip(values, exact))
                if ph_err <= 1e-3:
                    tuned, ratio = f"{kwargs['tol']:g}, {count}, {ph_err:.1e}", f"{count / ours.num_matvecs:.1f}"
                    break
            top6 = ", ".join(f"{v:.3g}" for v in reference[:6].tolist())
            print(f"| {steps} | {seed} | {top6} | {ours.num_matvecs}, {err:.1e} | {tuned} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: check that the script runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    (x, y), _ = hk.data.digits(seed=0)
    batch = 64 if args.quick else 512
    data = (x[:batch], y[:batch])
    criterion = nn.CrossEntropyLoss()
    repeat = 3 if args.quick else 20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")

    small = trained_model(hk.models.SmallCNN((4, 8) if args.quick else (16, 32)), *data, steps=20 if args.quick else 300)
    product_costs("SmallCNN", small, criterion, data, repeat)
    dense = hk.HessianOperator(small, criterion, data).dense().double()
    spectrum = torch.linalg.eigvalsh(dense)
    pyhessian_tols = [{"tol": t} for t in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6)]
    eig_steps = [{}] + [{"max_iter": m} for m in (20, 30, 40, 60, 80)]
    tuned = [("PyHessian 0.1 power iteration", pyhessian_run, pyhessian_tols),
             ("hessian-eigenthings Lanczos", eigenthings_run, eig_steps)]
    estimator_table("SmallCNN", small, criterion, data, spectrum.flip(0)[:5].tolist(), spectrum.sum().item(),
                    "(dense Hessian)", tuned, 1 if args.quick else 3)
    with_curvlinops = curvlinops_available()
    if with_curvlinops:
        equal_products_table("SmallCNN", small, criterion, data, spectrum.sum().item(), dense.diagonal(),
                             3 if args.quick else 10)
        layernorm_check(args.quick)
    block_lanczos_table(data, criterion, args.quick)
    matrices = default_matrices(data, criterion, args.quick)
    choose_defaults(matrices, **({"budgets": (30,), "seeds": 5} if args.quick else {}))
    if with_curvlinops:
        curvlinops_dense_table(matrices, 10 if args.quick else 200)
    if args.quick:
        eigen_products_across_training((4, 8), criterion, data, (20,), (0,), pyhessian_tols)
        return
    eigen_products_across_training((16, 32), criterion, data, (0, 30, 100, 300, 1000), (0, 1), pyhessian_tols)
    big = trained_model(hk.models.SmallCNN((32, 64), hidden=384), *data, steps=300)
    product_costs("SmallCNN (32, 64) + 384 hidden", big, criterion, data, repeat)
    big64, data64 = copy.deepcopy(big).double(), (data[0].double(), data[1])
    reference = hk.eigenvalues(hk.HessianOperator(big64, criterion, data64), k=5, tol=1e-10, seed=1)
    ref_trace = hk.trace(hk.HessianOperator(big, criterion, data), num_matvecs=3000, method="hutch++", seed=1)
    estimator_table("SmallCNN (32, 64) + 384 hidden", big, criterion, data, reference.values.tolist(), ref_trace.value,
                    f"(Hutch++ reference, 3,000 products, stderr {ref_trace.stderr:.2g})", tuned, 3)
    if with_curvlinops:
        equal_products_table("SmallCNN (32, 64) + 384 hidden (trace only: no exact diagonal)", big, criterion, data,
                             ref_trace.value, None, 5)


if __name__ == "__main__":
    main()
