"""Per-layer sensitivities for mixed-precision quantization: HAWQ v1/v2, Q-BERT, measured.

For a trained model with loss L and the weight W_i of quantizable layer i (n_i entries; biases
and norms stay in floating point), a quantization perturbation dW_i = Q_b(W_i) - W_i changes the
loss by about (1/2) dW_i^T H_i dW_i at a converged point (gradient ~ 0), H_i the Hessian block of
W_i alone. The papers summarise H_i by one number:

    "eigenvalue"  HAWQ (Dong et al., ICCV 2019):      S_i = lambda_max(H_i) / n_i, and
                  Omega_i = lambda_max(H_i) ||dW_i||^2, the worst case of dW^T H dW for that size.
    "trace"       HAWQ-V2 (Dong et al., NeurIPS 2020): S_i = Tr(H_i) / n_i, the average eigenvalue:
                  for a perturbation of random direction, E[dW^T H dW] = ||dW||^2 Tr(H) / n, so
                  Omega_i = (Tr(H_i) / n_i) ||dW_i||^2.
    "qbert"       Q-BERT (Shen et al., AAAI 2020): S_i = |mean_s lambda_i^(s)| + std_s lambda_i^(s),
                  the top eigenvalue on several disjoint data subsets s; the std penalises a
                  curvature that depends on the data, and |.| copes with negative top eigenvalues.
    "measured"    no proxy: S_i(b) = L(W with layer i alone quantized to b bits) - L(W), the loss
                  change itself (the baseline practitioners trust, OpenPPL/ppq#203, MQBench#170).

Beyond one number per layer: `pair_interactions` measures what quantizing two ADJACENT layers
together adds to their separate loss changes, and `cross_layer_interactions` the same for EVERY pair
of layers (CLADO, Deng et al., arXiv:2307.05657), the terms of CLADO's integer quadratic program
(`hk.quant.allocate_bits_iqp`).

The Hessian metrics use hesskit's operators and estimators: `HessianOperator` restricted to the
layer's weight for the eigenvalues (`eigenvalues`, Lanczos; HAWQ and PyHessian use power iteration,
which finds the same largest-magnitude eigenvalue with more products), and for the trace one
Rademacher probe z over *all* layers at once: z^T H z = sum_i z_i^T (H z)_i + (cross terms), and the
cross terms z_i^T H_ij z_j have mean 0, so the per-layer dot products z_i^T (H z)_i estimate every
Tr(H_i) from the same product (`hk.trace(op, blocks=...)`; HAWQ-V2 does not say how it batched
its probes). Each layer's estimate has its own standard error from the spread of its quadratic
forms.

Models. Inputs may be tensors (`model(x)`) or dicts (`model(**x)`, Hugging Face's `input_ids` and
`attention_mask`); `output_fn(outputs) -> tensor` picks what the criterion sees (default: a tensor
as it is, a ModelOutput's `logits`), so a sequence criterion such as `hk.SequenceCrossEntropy()`
works on a language model's (B, T, V) logits. Layers are `hk.quant.quantizable_layers`: Conv1D
(GPT-2) included, and a tied weight once, under its first module's name (GPT-2's `transformer.wte`,
which is also `lm_head`): its Hessian block is that of the one shared tensor, both uses included.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from .._batches import batch_list
from .._batches import mean_loss, num_samples, select_samples
from .._checks import check_count, is_int
from ..progress import progress_bar
from ..curvature.eigen import eigenvalues
from ..curvature.operators import HessianOperator, mode_sensitive_modules
from ..curvature.trace import trace
from .._model import requiring_grad
from .fake import LayerSwapper, check_bits, check_choices, check_layers

__all__ = [
    "METRICS",
    "Sensitivities",
    "sensitivities",
    "PairInteractions",
    "pair_interactions",
    "CrossLayerInteractions",
    "cross_layer_interactions",
    "rank_correlation",
]

METRICS = ("trace", "eigenvalue", "qbert", "measured")
TRACE_METHODS = ("joint", "hutchinson", "hutch++")


class Sensitivities(dict):
    """{layer name: sensitivity} (a dict) with what it took to get it.

    Attributes:
        metric: "trace", "eigenvalue", "qbert" or "measured" (see the module docstring).
        stderr: {layer: standard error of the value} where one exists (the Hutchinson trace), nan
            otherwise (Lanczos eigenvalues carry `residuals` instead, Q-BERT's statistic and
            measured losses are not random estimates).
        curvature: {layer: c_i}, the factor of ||Q_b(W_i) - W_i||^2 in the layer's cost Omega_i(b):
            Tr(H_i)/n_i for "trace", lambda_max(H_i) for "eigenvalue" (HAWQ's Omega), the value
            itself for "qbert"; empty for "measured", whose costs are measured per bit width.
        num_params: {layer: n_i}, the weight entries of the layer.
        table: "measured" only: {layer: {bits: loss change}} for every width measured.
        samples: "qbert": {layer: per-subset top eigenvalues}; "trace" (joint): {layer: the per-probe
            quadratic forms z_i^T (H z)_i / n_i}.
        residuals: "eigenvalue": {layer: ||H v - lambda v|| / n_i}, a bound on the error.
        bits, num_matvecs (Hessian-vector products in all), seed, wall_time, baseline_loss.
    """

    def __init__(self, values: Mapping[str, float] = (), *, metric: str = "", stderr: Mapping[str, float] | None = None,
                 curvature: Mapping[str, float] | None = None, num_params: Mapping[str, int] | None = None,
                 table: Mapping[str, Mapping[int, float]] | None = None,
                 samples: Mapping[str, np.ndarray] | None = None,
                 residuals: Mapping[str, float] | None = None, bits: Any = None, num_matvecs: int = 0,
                 seed: int | None = None, wall_time: float = 0.0, baseline_loss: float = math.nan):
        super().__init__(values)
        self.metric = metric
        self.stderr = dict(stderr or {name: math.nan for name in self})
        self.curvature = dict(curvature or {})
        self.num_params = dict(num_params or {})
        self.table = None if table is None else {k: dict(v) for k, v in table.items()}
        self.samples = dict(samples or {})
        self.residuals = dict(residuals or {})
        self.bits = bits
        self.num_matvecs = num_matvecs
        self.seed = seed
        self.wall_time = wall_time
        self.baseline_loss = baseline_loss

    def __repr__(self) -> str:
        values = ", ".join(f"{k!r}: {v:.4g}" for k, v in self.items())
        return f"Sensitivities(metric={self.metric!r}, {{{values}}})"


# ----------------------------------------------------------------------------- checks and helpers
def _check_mode(model: nn.Module, mode: str | None) -> None:
    if mode not in (None, "eval"):
        raise ValueError(f"mode: expected None or 'eval', got {mode!r}")
    batchnorms, dropouts = mode_sensitive_modules(model)
    if mode is None and model.training and (batchnorms or dropouts):
        raise ValueError(f"mode: the model is in train mode and has {', '.join(batchnorms + dropouts)}; "
                         "call model.eval() first or pass mode='eval'")


def _check_criterion(criterion: Any) -> None:
    if not callable(criterion):
        raise TypeError(f"criterion: expected a callable criterion(outputs, targets), got {type(criterion).__name__}")


def _bits_tuple(bits: Any, symmetric: bool) -> tuple[int, ...]:
    if bits is None:
        raise ValueError("bits: metric='measured' needs the bit width(s) to quantize each layer to, e.g. bits=2 "
                         "or bits=(2, 3, 4, 8)")
    if is_int(bits):
        return (check_bits(bits, symmetric),)
    return check_choices(bits, symmetric, "bits")


def _subsets(batches: list[Any], num_subsets: int) -> list[list[Any]]:
    """`num_subsets` disjoint parts of the data: consecutive groups of batches, or of the samples
    of a single batch (sizes differ by at most one)."""
    if len(batches) >= num_subsets:
        bounds = np.linspace(0, len(batches), num_subsets + 1).round().astype(int)
        return [batches[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if len(batches) == 1:
        n = num_samples(batches[0])
        if n < num_subsets:
            raise ValueError(f"num_subsets: expected at most the {n} samples of the batch, got {num_subsets}")
        bounds = np.linspace(0, n, num_subsets + 1).round().astype(int)
        return [[select_samples(batches[0], slice(a, b))] for a, b in zip(bounds[:-1], bounds[1:])]
    raise ValueError(f"num_subsets: with {len(batches)} batches, expected at most {len(batches)} subsets "
                     f"(or pass one batch to split), got {num_subsets}")


# ----------------------------------------------------------------------------- the estimators
def _weight(name: str) -> str:
    """The parameter name of a layer's weight (the canonical one: `quantizable_layers` lists owners)."""
    return f"{name}.weight" if name else "weight"


def _top_eigenvalue(model, criterion, data, name, which, tol, max_matvecs, seed, mode, output_fn):
    op = HessianOperator(model, criterion, data, params=[_weight(name)], mode=mode, output_fn=output_fn)
    result = eigenvalues(op, k=1, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed)
    return float(result.values[0]), float(result.residuals[0]), result.num_matvecs


# Each metric below returns ({layer: value}, the other fields of its `Sensitivities`). The
# Hessian metrics run with every chosen weight requiring grad (`sensitivities` sees to it).
def _measured_sensitivities(model, criterion, batches, mode, output_fn, names, widths, granularity, group_size,
                            symmetric, progress):
    """No proxy: S_i(b) = L(W with layer i alone quantized to b bits) - L(W) for every width b, the
    loss change itself (the baseline practitioners trust, OpenPPL/ppq#203, MQBench#170); the values
    are those of the smallest width."""
    swapper = LayerSwapper(model, names, widths, granularity, group_size, symmetric, mode)

    def loss(config: Mapping[str, int]) -> float:
        return mean_loss(swapper.apply(config), criterion, batches, output_fn=output_fn)

    base = loss({})
    table = {}
    with progress_bar(progress, len(names) * len(widths), "measured sensitivity", unit="loss") as bar:
        for name in names:
            table[name] = {}
            for b in widths:
                table[name][b] = loss({name: b}) - base
                bar.update()
    low = min(widths)
    return ({name: table[name][low] for name in names},
            dict(table=table, bits=widths if len(widths) > 1 else widths[0], baseline_loss=base))


def _layer_traces(op, names, m, method, seed, progress):
    """Tr(H_i) of each layer's own block by `hk.trace` (Hutchinson or Hutch++), one run per layer:
    ({layer: trace}, {layer: stderr}, {} (no per-probe samples), products used)."""
    values, stderr, used = {}, {}, 0
    with progress_bar(progress, len(names), f"trace ({method})", unit="layer") as bar:
        for name, block in zip(names, (op.restrict([_weight(n)]) for n in names)):
            result = trace(block, m, method=method, seed=seed)
            values[name], stderr[name], used = result.value, result.stderr, used + result.num_matvecs
            bar.update()
    return values, stderr, {}, used


def _trace_sensitivities(model, criterion, batches, mode, output_fn, names, sizes, num_matvecs, method, seed,
                         progress):
    """HAWQ-V2 (Dong et al., NeurIPS 2020): S_i = Tr(H_i) / n_i, the average eigenvalue, by
    Hutchinson probes over all layers at once (`method="joint"`, `hk.trace(op, blocks=...)`) or per
    layer; also the curvature c_i of Omega_i = (Tr(H_i) / n_i) ||dW_i||^2."""
    m = 100 if num_matvecs is None else check_count("num_matvecs", num_matvecs, 3 if method == "hutch++" else 1)
    op = HessianOperator(model, criterion, batches, params=[_weight(n) for n in names], mode=mode,
                         output_fn=output_fn)
    if method == "joint":
        result = trace(op, m, method="hutchinson", seed=seed, progress=progress,
                       blocks={n: [_weight(n)] for n in names})
        values, stderr, samples, used = result.values, result.stderr, result.samples, result.num_matvecs
    else:
        values, stderr, samples, used = _layer_traces(op, names, m, method, seed, progress)
    per = {n: values[n] / sizes[n] for n in names}
    return per, dict(stderr={n: stderr[n] / sizes[n] for n in names}, curvature=per,
                     samples={n: s / sizes[n] for n, s in samples.items()}, num_matvecs=used)


def _eigenvalue_sensitivities(model, criterion, batches, mode, output_fn, names, sizes, which, tol, num_matvecs,
                              seed, progress):
    """HAWQ (Dong et al., ICCV 2019): S_i = lambda_max(H_i) / n_i by Lanczos on each layer's block,
    with lambda_max(H_i) the curvature of Omega_i = lambda_max(H_i) ||dW_i||^2."""
    values, residuals, used = {}, {}, 0
    with progress_bar(progress, len(names), "top eigenvalue", unit="layer") as bar:
        for name in names:
            lam, res, count = _top_eigenvalue(model, criterion, batches, name, which, tol, num_matvecs, seed,
                                              mode, output_fn)
            values[name], residuals[name], used = lam, res, used + count
            bar.update()
    return ({n: values[n] / sizes[n] for n in names},
            dict(curvature=values, residuals={n: residuals[n] / sizes[n] for n in names}, num_matvecs=used))


def _qbert_sensitivities(model, criterion, batches, mode, output_fn, names, num_subsets, which, tol, num_matvecs,
                         seed, progress):
    """Q-BERT (Shen et al., AAAI 2020): S_i = |mean_s lambda_i^(s)| + std_s lambda_i^(s), the top
    eigenvalue of layer i on `num_subsets` disjoint data subsets s."""
    check_count("num_subsets", num_subsets, 2)
    parts = _subsets(batches, num_subsets)
    lams = {name: [] for name in names}
    used = 0
    with progress_bar(progress, len(parts) * len(names), "Q-BERT eigenvalues", unit="layer") as bar:
        for part in parts:
            for name in names:
                lam, _, count = _top_eigenvalue(model, criterion, part, name, which, tol, num_matvecs, seed, mode,
                                                output_fn)
                lams[name].append(lam)
                used += count
                bar.update()
    samples = {n: np.array(v) for n, v in lams.items()}
    stat = {n: abs(float(s.mean())) + float(s.std(ddof=1)) for n, s in samples.items()}
    return stat, dict(curvature=stat, samples=samples, num_matvecs=used)


def sensitivities(model: nn.Module, criterion: Any, data: Any, metric: str = "trace", *, bits: Any = None,
                  num_matvecs: int | None = None, num_subsets: int = 5, seed: int | None = 0,
                  method: str = "joint", which: str = "magnitude", tol: float = 1e-3,
                  layers: Sequence[str] | None = None, granularity: str | None = None,
                  group_size: int | None = None, symmetric: bool = False, mode: str | None = None,
                  output_fn: Any = None, progress: bool = False) -> Sensitivities:
    """Per-layer sensitivity of `model`'s loss to quantizing each layer's weight.

    Args:
        model, criterion, data: the loss (1/N) sum criterion(model(x), y) over `data` (one (x, y)
            batch or a list/DataLoader of batches; x a tensor or a dict of model inputs), as for
            `hk.HessianOperator`. The Hessian is taken over the layers' weights only (biases stay
            in floating point).
        metric: "trace" (HAWQ-V2, Tr(H_i)/n_i), "eigenvalue" (HAWQ, lambda_max(H_i)/n_i), "qbert"
            (Q-BERT, |mean| + std of lambda_max(H_i) over `num_subsets` disjoint data subsets) or
            "measured" (the loss change of quantizing layer i alone to `bits`). Default "trace",
            HAWQ-V2's metric (kept by HAWQ-V3); measured: with `allocate_bits`' defaults at 2.5
            average bits it beat uniform 2-bit in test loss on all ten models tried (notebook 11's
            and 14's digits MLPs, a CNN, notebook 12's transformer, a GPT-2 character LM, two
            seeds each) and on the held-out digits MLP.
        bits: "measured" only (ignored otherwise): one width, or several (then `.table` holds every
            width and the values are those of the smallest).
        num_matvecs: "trace": Hutchinson probes, each one Hessian-vector product for all layers
            together (`method="joint"`) or per layer. Default 100, PyHessian's maxIter (the tool
            HAWQ-V2's traces come from); measured on six models (four of the repo's, the held-out
            MLP twice), five seeds each: the allocation at 2.5 bits was that of a per-layer Hutch++
            reference (300 products a layer) in 29 of 30 runs, at 3 bits in 26 of 30 (with 10
            probes: 27 and 19). Eigenvalue metrics: the product budget of each Lanczos run
            (default `hk.eigenvalues`' 20 x basis size).
        method: "trace" only. "joint" (default, hesskit's): one Rademacher probe over all layers
            at once, `hk.trace(op, blocks=...)`, whose per-layer quadratic forms estimate every
            Tr(H_i) from the same product (L times cheaper than a pass per layer, noisier per
            layer: the README's comparison with PyHessian); "hutchinson" or "hutch++": `hk.trace`
            on each layer's block, with Hutch++'s lower variance at L times the cost.
        num_subsets: "qbert": the number of disjoint subsets (consecutive batches, or parts of a
            single batch); at least 2, for a standard deviation. Default 5, hesskit's choice, not
            the paper's (Q-BERT used about 10% of the training data in each subset).
        seed: probes and Lanczos start vectors (default 0: the same numbers every call).
        which: eigenvalue metrics: "magnitude" (default: the signed eigenvalue of largest
            magnitude, what HAWQ's and PyHessian's power iteration returns, and how Q-BERT can see
            negative "top" eigenvalues) or "largest" (algebraic).
        tol: Lanczos tolerance (default 1e-3, PyHessian's).
        layers: a subset of `hk.quant.quantizable_layers(model)` (default: all; a tied weight is
            one layer, named after its first module, e.g. GPT-2's `transformer.wte`, not `lm_head`).
        granularity, group_size, symmetric: the quantizer of "measured", with `hk.quant.fake_quantize`'s
            defaults (one asymmetric range per output channel); pass what `quantize_model` will use.
        mode: None (the model as it is; a model in train mode with BatchNorm or dropout is refused)
            or "eval".
        output_fn: `output_fn(model outputs) -> tensor` for the criterion (default: a tensor as it
            is, a ModelOutput's `logits`).
        progress: show a progress bar: of the products for the joint trace, else of the layers
            (per subset for "qbert", per layer and width for "measured").

    Returns a `Sensitivities` dict {layer: value} with `.stderr`, `.curvature` (the factor of
    ||Q_b(W_i) - W_i||^2 in the allocation cost), `.num_params`, `.num_matvecs`, `.seed`.
    The model is not modified; frozen weights (requires_grad=False) are differentiated all the same,
    their flags restored.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if method not in TRACE_METHODS:
        raise ValueError(f"method: expected one of {TRACE_METHODS}, got {method!r}")
    if which not in ("magnitude", "largest"):
        raise ValueError(f"which: expected 'magnitude' or 'largest', got {which!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_criterion(criterion)
    _check_mode(model, mode)
    modules = check_layers(model, layers)
    names = list(modules)
    batches = batch_list(data)
    sizes = {name: modules[name].weight.numel() for name in names}
    start = time.perf_counter()
    loss = (model, criterion, batches, mode, output_fn)  # the loss every metric looks at
    if metric == "measured":
        widths = _bits_tuple(bits, symmetric)
        values, details = _measured_sensitivities(*loss, names, widths, granularity, group_size, symmetric, progress)
    else:
        with requiring_grad([modules[n].weight for n in names]):  # frozen weights too; flags restored
            if metric == "trace":
                values, details = _trace_sensitivities(*loss, names, sizes, num_matvecs, method, seed, progress)
            elif metric == "eigenvalue":
                values, details = _eigenvalue_sensitivities(*loss, names, sizes, which, tol, num_matvecs, seed,
                                                            progress)
            else:
                values, details = _qbert_sensitivities(*loss, names, num_subsets, which, tol, num_matvecs, seed,
                                                       progress)
    return Sensitivities(values, metric=metric, num_params=sizes, seed=seed, wall_time=time.perf_counter() - start,
                         **details)


# ----------------------------------------------------------------------------- inter-layer terms
@dataclass
class PairInteractions:
    """Measured interactions of adjacent layers (a published, implementable stand-in for the
    inter-layer dependencies of Schaefer et al. 2023, whose exact term is NOT reproduced here).

    With D_i(a) the measured loss change of quantizing layer i alone to a bits, and D_ij(a, b) that
    of quantizing layers i and j = i + 1 together,

        terms[i][a, b] = D_ij(a, b) - D_i(a) - D_j(b),

    the part of the joint damage that the additive (block-diagonal) model misses. `singles[i, a]`
    is D_i(choices[a]). Added to an additive objective, it makes the cost a chain
    sum_i c_i(b_i) + sum_i terms[i][b_i, b_{i+1}], which `pareto_frontier`/`allocate_bits` still
    minimise exactly. `CrossLayerInteractions` measures every pair (CLADO)."""

    layers: list[str]
    choices: tuple[int, ...]
    singles: np.ndarray  # (L, B)
    terms: np.ndarray  # (L - 1, B, B)
    baseline_loss: float
    num_evaluations: int


@dataclass
class CrossLayerInteractions:
    """CLADO's cross-layer terms (Deng, Sharify, Wang & Orshansky, "Mixed-precision quantization for
    deep vision models with integer quadratic programming", arXiv:2307.05657, DAC 2025) for EVERY
    pair of layers, not only adjacent ones.

    CLADO expands the loss change of a configuration to second order, Delta L ~ g^T d + (1/2) d^T H d
    with d = (d_1, ..., d_L) the layers' quantization perturbations, and splits it into one term
    per layer and one per pair: Delta L ~ sum_i D_i(b_i) + sum_{i<j} d_i^T H_ij d_j. With D_i(a) the
    measured loss change of layer i alone at a bits and D_ij(a, c) that of layers i and j together,
    the quadratic model gives D_ij = D_i + D_j + d_i^T H_ij d_j, so each cross term is the linear
    combination of three forward-only measurements (CLADO's "linear equations"):

        terms[i, j, a, c] = D_ij(a, c) - D_i(a) - D_j(c)          (i != j; exact for a quadratic loss)

    `terms` is (L, L, B, B), symmetric (terms[j, i, c, a] = terms[i, j, a, c]) with zero blocks on
    the diagonal; `singles[i, a]` is D_i(choices[a]). L |B| + L (L - 1) / 2 |B|^2 loss evaluations
    (plus the baseline). `adjacent()` is the chain subset (`PairInteractions`, the same numbers);
    `hk.quant.cost_table(model, interactions)` and `hk.quant.allocate_bits_iqp` turn them into CLADO's
    integer quadratic program."""

    layers: list[str]
    choices: tuple[int, ...]
    singles: np.ndarray  # (L, B)
    terms: np.ndarray  # (L, L, B, B)
    baseline_loss: float
    num_evaluations: int

    def adjacent(self) -> PairInteractions:
        """The terms of consecutive layers only: the adjacent-pair model from the same measurements."""
        L = len(self.layers)
        terms = np.array([self.terms[i, i + 1] for i in range(L - 1)]).reshape(max(L - 1, 0), *self.terms.shape[2:])
        count = 1 + self.singles.size + max(L - 1, 0) * len(self.choices) ** 2
        return PairInteractions(list(self.layers), self.choices, self.singles.copy(), terms, self.baseline_loss, count)


def _measure_pairs(model, criterion, data, choices, pairs, layers, granularity, group_size, symmetric, mode,
                   output_fn):
    """The measurements behind `pair_interactions` and `cross_layer_interactions`: the baseline
    loss, D_i(a) of every layer and width, and D_ij(a, c) - D_i(a) - D_j(c) of every (i, j) in
    `pairs` (indices into the layers, `pairs(L)` lists them) and every two widths, on one working
    copy of the model (`LayerSwapper`). Returns (layers, widths, singles (L, B), {(i, j): (B, B)},
    baseline, number of loss evaluations)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_criterion(criterion)
    _check_mode(model, mode)
    widths = check_choices(choices, symmetric)
    names = list(check_layers(model, layers))
    batches = batch_list(data)
    swapper = LayerSwapper(model, names, widths, granularity, group_size, symmetric, mode)

    def loss(config: Mapping[str, int]) -> float:
        return mean_loss(swapper.apply(config), criterion, batches, output_fn=output_fn)

    base = loss({})
    singles = np.array([[loss({n: b}) - base for b in widths] for n in names]).reshape(len(names), len(widths))
    terms = {}
    for i, j in pairs(len(names)):
        terms[i, j] = np.array([[loss({names[i]: ba, names[j]: bc}) - base - singles[i, a] - singles[j, c]
                                 for c, bc in enumerate(widths)] for a, ba in enumerate(widths)])
    return names, widths, singles, terms, base, 1 + singles.size + len(terms) * len(widths) ** 2


def pair_interactions(model: nn.Module, criterion: Any, data: Any, choices: Sequence[int] = (2, 3, 4, 8), *,
                      layers: Sequence[str] | None = None, granularity: str | None = None,
                      group_size: int | None = None, symmetric: bool = False, mode: str | None = None,
                      output_fn: Any = None) -> PairInteractions:
    """Measure the interaction terms of every pair of consecutive quantizable layers (in model
    order) at every pair of widths in `choices`: L |B| + (L - 1) |B|^2 loss evaluations. Data,
    `output_fn` and layers as for `sensitivities`.

    `choices` defaults to `allocate_bits`' (2, 3, 4, 8), so that the terms fit its cost table;
    `granularity`, `group_size` and `symmetric` default to `hk.quant.fake_quantize`'s (one
    asymmetric range per output channel): pass what the allocation and `quantize_model` use.
    Consecutive in model order is "adjacent" for a chain (an MLP, a plain CNN); for residual
    networks it is a heuristic (`cross_layer_interactions` measures every pair). The model is not
    modified."""
    names, widths, singles, terms, base, count = _measure_pairs(
        model, criterion, data, choices, lambda L: [(i, i + 1) for i in range(L - 1)], layers, granularity,
        group_size, symmetric, mode, output_fn)
    L, B = len(names), len(widths)
    chain = np.array([terms[i, i + 1] for i in range(L - 1)]).reshape(max(L - 1, 0), B, B)
    return PairInteractions(names, widths, singles, chain, base, count)


def cross_layer_interactions(model: nn.Module, criterion: Any, data: Any, choices: Sequence[int] = (2, 3, 4, 8), *,
                             layers: Sequence[str] | None = None, granularity: str | None = None,
                             group_size: int | None = None, symmetric: bool = False, mode: str | None = None,
                             output_fn: Any = None) -> CrossLayerInteractions:
    """CLADO's measured cross-layer terms (Deng et al., arXiv:2307.05657) of EVERY pair of
    quantizable layers at every pair of widths in `choices` (see `CrossLayerInteractions`):
    1 + L |B| + L (L - 1) / 2 |B|^2 loss evaluations of the model with one or two layers quantized,
    forward passes only. Data (CLADO's small calibration set), `output_fn` and layers as for
    `sensitivities`.

    Defaults: `choices` (2, 3, 4, 8), `allocate_bits`' (CLADO's experiments mix {2, 4, 8}-bit
    weights: pass them to match); the loss is the mean criterion over `data` (CLADO's official
    code measures the calibration loss the same way, with the float model's loss as the
    reference); `granularity`, `group_size`, `symmetric`: `hk.quant.fake_quantize`'s (one asymmetric
    range per output channel): pass what the allocation and `quantize_model` use. The model is not
    modified."""
    names, widths, singles, terms, base, count = _measure_pairs(
        model, criterion, data, choices, lambda L: list(itertools.combinations(range(L), 2)), layers, granularity,
        group_size, symmetric, mode, output_fn)
    L, B = len(names), len(widths)
    full = np.zeros((L, L, B, B))
    for (i, j), t in terms.items():
        full[i, j], full[j, i] = t, t.T
    return CrossLayerInteractions(names, widths, singles, full, base, count)


# ----------------------------------------------------------------------------- proxy quality
def rank_correlation(proxy: Any, measured: Any) -> float:
    """Spearman's rank correlation rho between a proxy and the measured truth.

    Either two {layer: value} mappings with the same keys (per-layer sensitivities), or two
    equally long sequences/arrays (e.g. the predicted cost and the measured loss change of every
    enumerated configuration). rho = 1: the proxy orders everything as the truth does."""
    from scipy.stats import spearmanr

    if isinstance(proxy, Mapping) != isinstance(measured, Mapping):
        raise TypeError("proxy, measured: expected two mappings {layer: value} or two sequences, got one of each")
    if isinstance(proxy, Mapping):
        if set(proxy) != set(measured):
            raise ValueError(f"proxy, measured: expected the same layers, got {sorted(proxy)} and {sorted(measured)}")
        keys = list(proxy)
        a = np.array([float(proxy[k]) for k in keys])
        b = np.array([float(measured[k]) for k in keys])
    else:
        a, b = np.asarray(proxy, dtype=float).ravel(), np.asarray(measured, dtype=float).ravel()
    if len(a) != len(b):
        raise ValueError(f"proxy, measured: expected the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"proxy: expected at least 2 values to rank, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("proxy, measured: contain nan or inf")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan  # a constant ranking correlates with nothing
    return float(spearmanr(a, b).statistic)
