"""Compression benchmark: Hessian-aware bit allocation, group-wise quantization, GPTQ and OBS pruning.

    python bench/compression.py           # the README tables (about 10 minutes on 2 CPU cores)
    python bench/compression.py --quick   # tiny budgets: checks that the script runs (< 60 s); numbers mean nothing

Protocol (weight-only post-training compression, no fine-tuning, so each table isolates one effect). Everything
reuses the tested experiment functions of the notebooks (`hesskit.experiments.hawq`, `.qbert`, `.gptq`, `.pruning`).
* Tasks, trained here from seeded code (nothing downloads), seeds 0, 1, 2 (initialisation and batch order):
  - "digits MLP": 64 -> five 64x64 ReLU layers -> 10 (six equal-width layers, 25k weights; quantization.md's pilot
    E4), Adam on 80% of scikit-learn's digits (`hawq.digits_problem`); test accuracy on the other 20%.
  - "tiny transformer": `hk.models.TinyTransformer` (one pre-LN block, fused qkv projection, 8 heads) on
    `hk.data.sequences` (label = the most frequent token; `qbert.train_tiny_transformer`); six quantizable layers:
    embedding, qkv, attention output, two MLP layers and the head.
* Calibration: 256 training samples; Q-BERT's statistic over 5 disjoint batches of 128. Weights: symmetric
  per-output-channel grids (HAWQ-V3's) unless stated; `hk.quant`'s default grid is asymmetric per output channel.
  Accuracy is test accuracy in %, mean +- standard deviation over the seeds; seconds are the method's own wall time
  (curvature included), median over seeds, one thread.
* Allocation at 2.5 average bits (choices 2, 3, 4, 8 bits per layer), each proxy minimised exactly under the size
  budget (`hk.quant.allocate_bits`'s knapsack): HAWQ-V2 (Tr(H_i)/n_i from 100 joint Hutchinson probes), HAWQ
  (lambda_max), Q-BERT (|mean| + std of lambda_max), ||dW||^2 alone (no Hessian), measured single-layer loss changes,
  and measured + adjacent-pair interactions; CLADO (Deng et al., DAC 2025): measured terms for every pair of
  layers, its integer quadratic program solved exactly (`hk.quant.allocate_bits_iqp`, a MILP), with and without the
  official code's PSD projection; against uniform 2-bit, the median over all configurations that use 85-100% of the
  budget, and the exhaustive best of all 4^6 = 4,096 configurations (an oracle: best test accuracy).
  Two more rows use `hk.quant`'s defaults throughout (asymmetric per-channel grids, `sensitivities` and
  `allocate_bits` with only their required arguments): the HAWQ-V2 allocation and uniform 2-bit.
* Group-wise quantization at 2 and 3 bits, symmetric and asymmetric grids: one range per matrix, per output channel
  (asymmetric: `hk.quant`'s default), Q-BERT row groups of 4 rows (one head of the transformer's qkv), and
  GPTQ-style column groups of 16 and 8; the bits per weight include the fp16 scales and, asymmetric, the zero
  points (`hk.quant.model_size`).
* GPTQ vs round-to-nearest at 2, 3 and 4 bits (asymmetric per-channel grids, the official default; sequential over
  the Linear layers; 256 calibration inputs).
* Pruning at 50/70/90% global sparsity of the Linear weights: magnitude, OBD (the exact Gauss-Newton diagonal, as LeCun et
  al.: `hk.GGNOperator.exact_diagonal`) and OBS with the M-FAC/WoodFisher inverse of the damped empirical Fisher (256
  per-sample gradients, blocks of 128, damping 1e-5), one shot, with M-FAC's 16 recomputations (gradients
  recomputed at the pruned weights between steps), and as `hk.prune.obs(model, criterion, calibration, s)` runs
  it by default: M-FAC's schedule scaled with the sparsity, 16 steps per halving of the density (16, 28 and 54 steps
  to 50, 70 and 90%), on all 256 calibration samples.
* Reference implementations: HAWQ's released code ships hard-coded traces and needs CUDA; Q-BERT has no code; the
  official GPTQ and M-FAC need CUDA. So the one reference run here is PyHessian's trace per layer, the route HAWQ-V2
  users take (one PyHessian `trace()` per layer), against hesskit's joint Hutchinson pass over all layers and its
  per-layer Hutch++, with the same number of probes per layer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hesskit as hk  # noqa: E402
from hesskit.quant.gptq import round_to_nearest  # noqa: E402
from hesskit.quant import (allocate_bits_iqp, cost_table, cross_layer_interactions, pair_interactions,  # noqa: E402
                           sensitivities)
from hesskit.experiments import hawq, pruning, qbert  # noqa: E402
from hesskit.experiments.hawq import HAWQProblem  # noqa: E402

CRITERION = nn.CrossEntropyLoss()
PROXIES = ("trace", "eigenvalue", "qbert", "weights", "measured", "pairs")


# ------------------------------------------------------------------ tasks
def make_task(name: str, seed: int, quick: bool) -> HAWQProblem:
    """A trained model with its calibration, Q-BERT subsets and test data."""
    if name == "digits MLP":
        return hawq.digits_problem(seed=seed, steps=200 if quick else 2000)
    task = qbert.train_tiny_transformer(seed=seed, steps=100 if quick else 1000,
                                        num_test=512 if quick else 2048)
    x, y = task.train
    subsets = [(x[i * 128:(i + 1) * 128], y[i * 128:(i + 1) * 128]) for i in range(5)]
    return HAWQProblem(task, CRITERION, (x[:256], y[:256]), subsets, "channel")


def accuracy(problem: HAWQProblem, model: nn.Module | None = None) -> float:
    return 100.0 * problem.accuracy(model)


def timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cell(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def seconds_cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "n/a"


# ------------------------------------------------------------------ allocation
def allocation_rows(problem: HAWQProblem, avg_bits: float, quick: bool) -> dict[str, tuple[float, float]]:
    """{method: (test accuracy %, seconds)} at `avg_bits` for one trained task."""
    choices = (2, 8) if quick else (2, 3, 4, 8)
    m, c = problem.trained.model, problem.criterion
    probes = 16 if quick else 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged Lanczos warnings in quick mode
        runs = {
            "trace": lambda: sensitivities(m, c, problem.calibration, "trace", num_matvecs=probes, seed=0),
            "eigenvalue": lambda: sensitivities(m, c, problem.calibration, "eigenvalue", seed=0),
            "qbert": lambda: sensitivities(m, c, problem.subsets, "qbert", num_subsets=len(problem.subsets), seed=0),
            "measured": lambda: sensitivities(m, c, problem.calibration, "measured", bits=choices,
                                              **problem.quantizer),
        }
        sens, seconds = {}, {"weights": 0.0}
        for key, run in runs.items():
            sens[key], seconds[key] = timed(run)
        pairs, extra = timed(lambda: pair_interactions(m, c, problem.calibration, choices, **problem.quantizer))
        cross, cross_seconds = timed(lambda: cross_layer_interactions(m, c, problem.calibration, choices,
                                                                      **problem.quantizer))
    seconds["pairs"] = seconds["measured"] + extra
    tables = hawq.proxy_tables(problem, sens, pairs, choices)
    enumeration, enum_seconds = timed(lambda: hawq.enumerate_configs(problem, choices))
    result = hawq.compare_at_budget(tables, enumeration, avg_bits)
    names = {v: k for k, v in hawq.PROXIES.items()}
    out = {names[key]: (100 * result.chosen[key][1], seconds[key]) for key in PROXIES}
    clado = cost_table(m, cross, choices, **problem.quantizer)  # CLADO: every pair of layers, its exact IQP
    for label, psd in (("CLADO: measured terms of every pair, exact IQP", False),
                       ("CLADO + PSD projection (official code)", True)):
        allocation, solve = timed(lambda: allocate_bits_iqp(clado, avg_bits, psd=psd))
        out[label] = (100 * enumeration.value(allocation, "accuracy"), cross_seconds + solve)
    out["uniform 2-bit"] = (100 * enumeration.value({n: 2 for n in enumeration.layers}, "accuracy"), 0.0)
    out[f"random configurations, 85-100% of the budget (median of {result.num_random})"] = (100 * result.random_median,
                                                                                          0.0)
    out[f"exhaustive best of {len(enumeration.configs):,} (oracle)"] = (100 * result.best[1], enum_seconds)
    return out


def default_allocation_rows(problem: HAWQProblem, avg_bits: float, quick: bool) -> dict[str, tuple[float, float]]:
    """{method: (test accuracy %, seconds)} of `hk.quant`'s defaults throughout (asymmetric per-channel grids):
    HAWQ-V2's allocation from `sensitivities` and `allocate_bits` with only their required arguments (choices
    2/8 in quick mode), and uniform 2-bit."""
    m, c = problem.trained.model, problem.criterion
    choices = (2, 8) if quick else (2, 3, 4, 8)

    def allocate():
        return hk.quant.allocate_bits(m, sensitivities(m, c, problem.calibration), avg_bits, choices)

    allocation, seconds = timed(allocate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hk.quant.UncompressedWarning)  # the transformer's norms and positions
        uniform = hk.quant.quantize_model(m, 2)
    return {"HAWQ-V2, `hk.quant`'s defaults (asymmetric grids)": (accuracy(problem, hk.quant.quantize_model(
                m, dict(allocation))), seconds),
            "uniform 2-bit, asymmetric grids (`quantize_model(model, 2)`)": (accuracy(problem, uniform), 0.0)}


# ------------------------------------------------------------------ groups
GROUPINGS = {"one range per matrix": ("tensor", None), "per output channel": ("channel", None),
             "row groups of 4 (Q-BERT; one head of the qkv)": ("rows", 4),
             "column groups of 16 (GPTQ g16)": ("columns", 16), "column groups of 8 (GPTQ g8)": ("columns", 8)}


def group_rows(problem: HAWQProblem, bits: int, symmetric: bool) -> dict[str, tuple[float, float]]:
    """{grouping: (test accuracy %, bits per weight including the scales and zero points)} at `bits`."""
    model = problem.trained.model
    out = {}
    for label, (granularity, group_size) in GROUPINGS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hk.quant.UncompressedWarning)  # the transformer's norms and positions
            q = hk.quant.quantize_model(model, bits, granularity, group_size, symmetric)
        size = hk.quant.model_size(model, bits, granularity, group_size, symmetric)
        out[label] = (accuracy(problem, q), size.bits_per_weight)
    return out


def group_table(name: str, problems: list[HAWQProblem]) -> None:
    """The group-wise table: accuracy at 2 and 3 bits on symmetric and asymmetric grids, and the storage."""
    runs = {(b, sym): collect([group_rows(p, b, sym) for p in problems]) for b in (2, 3) for sym in (True, False)}
    print_table(f"{name}: group-wise quantization (the same bits everywhere; symmetric grids as HAWQ and Q-BERT, "
                "asymmetric as GPTQ; asymmetric per output channel is `hk.quant`'s default)",
                ["grouping", "2-bit symmetric %", "2-bit asymmetric %", "3-bit symmetric %", "3-bit asymmetric %",
                 "bits per weight at 3 bits, symmetric / asymmetric"],
                {k: [cell(runs[b, sym][k][0]) for b in (2, 3) for sym in (True, False)]
                 + [f"{runs[3, True][k][1][0]:.3f} / {runs[3, False][k][1][0]:.3f}"] for k in GROUPINGS})


# ------------------------------------------------------------------ GPTQ and pruning
def gptq_rows(problem: HAWQProblem, bits: int) -> dict[str, tuple[float, float]]:
    model, calib = problem.trained.model, problem.calibration[0]
    rtn, rtn_seconds = timed(lambda: round_to_nearest(model, bits))
    q, gptq_seconds = timed(lambda: hk.quant.gptq(model, calib, bits))
    return {"round to nearest": (accuracy(problem, rtn), rtn_seconds), "GPTQ": (accuracy(problem, q), gptq_seconds)}


PRUNERS = {"magnitude": "magnitude", "obd": "OBD (exact Gauss-Newton diagonal)",
           "obs": "OBS one-shot (M-FAC inverse, blocks of 128)"}


def pruning_rows(problem: HAWQProblem, quick: bool) -> dict[str, dict[float, tuple[float, float]]]:
    """{method: {sparsity: (test accuracy %, seconds)}}; one-shot methods share their curvature over the
    sparsities (their seconds cover all three), OBS with recomputations is timed per sparsity."""
    sparsities = (0.5, 0.7, 0.9)
    m, c, calib = problem.trained.model, problem.criterion, problem.calibration
    grads = 64 if quick else 256
    curve = pruning.one_shot_curve(m, c, calib, problem.trained.test, sparsities, num_grads=grads, obd_curvature="ggn",
                                   num_matvecs=16 if quick else 100, seed=0)
    out = {PRUNERS[k]: {s: (100 * a, curve.seconds[k]) for s, a in zip(sparsities, curve.accuracy[k])}
           for k in curve.accuracy}
    steps = 2 if quick else 16
    label = f"OBS with {steps} recomputations (M-FAC)"
    out[label] = {}
    for s in sparsities:
        pruned, seconds = timed(lambda: hk.prune.obs(m, c, calib, s, num_grads=grads, num_recomputations=steps, seed=0))
        out[label][s] = (accuracy(problem, pruned), seconds)
    # the default call: every calibration sample, M-FAC's 16 steps per halving of the density (16/28/54 steps)
    label = "OBS, `hk.prune.obs` defaults (16 steps per halving of the density)"
    out[label] = {}
    for s in sparsities:
        data = (calib[0][:grads], calib[1][:grads])
        pruned, seconds = timed(lambda: hk.prune.obs(m, c, data, s, num_recomputations=2 if quick else None))
        out[label][s] = (accuracy(problem, pruned), seconds)
    return out


# ------------------------------------------------------------------ reference: per-layer traces
def trace_reference(problem: HAWQProblem, probes: int) -> list[tuple[str, float, str]]:
    """Per-layer traces three ways at `probes` probes per layer: hesskit's joint pass (every probe serves all
    layers), hesskit's per-layer Hutch++, and PyHessian's `trace()` run once per layer (HAWQ-V2's route)."""
    model, calib = problem.trained.model, problem.calibration
    layers = len(hk.quant.quantizable_layers(model))
    rows = []
    for method, label in (("joint", "one Hutchinson pass over all layers"), ("hutch++", "Hutch++ per layer")):
        sens, seconds = timed(lambda: sensitivities(model, CRITERION, calib, "trace", num_matvecs=probes, seed=0,
                                                    method=method))
        worst = max(sens.stderr[n] / abs(sens[n]) for n in sens)
        rows.append((f"hesskit `sensitivities(metric=\"trace\", method=\"{method}\")`: {label}", seconds,
                     f"{sens.num_matvecs} products; largest relative stderr of a layer {100 * worst:.1f}%"))
    try:
        import pyhessian
    except ImportError:
        return rows

    def per_layer() -> float:
        worst = 0.0
        for name in hk.quant.quantizable_layers(model):
            clone = copy.deepcopy(model)
            for pname, p in clone.named_parameters():
                p.requires_grad_(pname == f"{name}.weight")
            h = pyhessian.hessian(clone, CRITERION, data=calib, cuda=False)
            samples = torch.tensor(h.trace(maxIter=probes, tol=0.0), dtype=torch.float64)
            worst = max(worst, (samples.std() / len(samples) ** 0.5 / samples.mean().abs()).item())
        return worst

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyHessian's backward(create_graph=True) warns about a reference cycle
        worst, seconds = timed(per_layer)
    rows.append(("PyHessian 0.1: `trace()` once per layer", seconds,
                 f"{probes * layers} products; largest relative stderr of a layer {100 * worst:.1f}% "
                 "(computed here from its samples; it reports none)"))
    return rows


# ------------------------------------------------------------------ report
def collect(results: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per-seed {label: (value, seconds)} dicts -> {label: (values over seeds, seconds over seeds)}."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for result in results:
        for label, (value, seconds) in result.items():
            values, times = out.setdefault(label, ([], []))
            values.append(value)
            times.append(seconds)
    return out


def print_table(title: str, columns: list[str], rows: dict[str, list[str]], text_last: bool = False) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1 - text_last) + "---|" * text_last)
    for label, cells in rows.items():
        print(f"| {label.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")


def report_task(name: str, problems: list[HAWQProblem], quick: bool) -> None:
    print(f"\n## {name}: float test accuracy {cell([accuracy(p) for p in problems])} %")
    alloc = collect([{**allocation_rows(p, 2.5, quick), **default_allocation_rows(p, 2.5, quick)} for p in problems])
    print_table(f"{name}: bit allocation at 2.5 average bits (choices {'2/8' if quick else '2/3/4/8'}, symmetric "
                "per-channel grids unless stated)", ["method", "test accuracy %", "seconds"],
                {k: [cell(v), seconds_cell(t) if any(t) else "-"] for k, (v, t) in alloc.items()})
    group_table(name, problems)
    gptq = {b: collect([gptq_rows(p, b) for p in problems]) for b in (2, 3, 4)}
    print_table(f"{name}: GPTQ vs round-to-nearest (asymmetric per-channel grids, "
                f"{len(problems[0].calibration[1])} calibration inputs)",
                ["method", "2-bit accuracy %", "3-bit accuracy %", "4-bit accuracy %", "seconds (4-bit)"],
                {k: [cell(gptq[b][k][0]) for b in (2, 3, 4)] + [seconds_cell(gptq[4][k][1])] for k in gptq[2]})
    curves = [pruning_rows(p, quick) for p in problems]
    print_table(f"{name}: pruning the Linear weights (global sparsity, no fine-tuning)",
                ["method", "50% accuracy %", "70% accuracy %", "90% accuracy %", "seconds (one-shot: all three; "
                 "recomputed: at 90%)"],
                {method: [cell([c[method][s][0] for c in curves]) for s in (0.5, 0.7, 0.9)]
                 + [seconds_cell([c[method][0.9][1] for c in curves])] for method in curves[0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check that the script runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    print(f"torch {torch.__version__}, 1 thread, float32, CPU; seeds {seeds}")
    for name in ("digits MLP", "tiny transformer"):
        report_task(name, [make_task(name, s, args.quick) for s in seeds], args.quick)
    probes = 8 if args.quick else 64
    rows = trace_reference(make_task("digits MLP", 0, args.quick), probes)
    print_table(f"Per-layer Hessian traces for HAWQ-V2 (digits MLP, seed 0, {probes} probes per layer): hesskit against "
                "the reference",
                ["library", "seconds", "x the joint pass", "products and spread"],
                {label: [f"{s:.2f}", f"{s / rows[0][1]:.1f}", note] for label, s, note in rows}, text_last=True)


if __name__ == "__main__":
    main()
