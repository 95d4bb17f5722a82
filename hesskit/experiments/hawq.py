"""Notebook 11 (`11_hawq_mixed_precision.ipynb`): HAWQ, Hessian-aware mixed-precision quantization,
judged by exhaustive enumeration.

The experiment: an equal-width deep MLP on the digits (64 -> five
64 x 64 layers -> 10, ReLU), weight-only symmetric per-channel round-to-nearest quantization (HAWQ-V3's
grid, passed explicitly: `hk.quant`'s default grid is asymmetric), widths
{2, 3, 4, 8} per layer, so 4^6 = 4,096 configurations, ALL of which are evaluated (a few seconds,
thanks to prefix sharing: `enumerate_configs`). Against that ground truth:

- how well each sensitivity proxy ranks configurations (Spearman rho of predicted Omega against the
  measured loss change, `correlations`), HAWQ-V2's trace, HAWQ's lambda_max, Q-BERT's |mean| + std,
  the curvature-free ||dW||^2, the measured single-layer loss changes, and the same plus measured
  interactions of adjacent layers (`all_sensitivities`, `proxy_tables`);
- what the allocation at a budget buys (`compare_at_budget`): against uniform precision, the median
  of random configurations of the same size, and the exhaustive best;
- the whole pipeline over several seeds (`seed_study`);
- cross-layer terms (`cross_layer_tables`, `oracle_comparison`, `cross_layer_study`): CLADO's
  measured terms for every pair of layers and its integer quadratic program, against the
  per-layer additive model and the adjacent-pair model, each minimised exactly under the same
  size budget and judged by the exhaustive oracle (the configuration of least measured loss), on
  the digits MLP and on notebook 12's tiny transformer (`transformer_problem`, whose 4^6
  configurations `enumerate_configs` also shares prefixes for).

Everything here is a pure function of its arguments (seeded), so `bench/` can reuse it; the
explorer is `hesskit.widgets.hawq.HAWQExplorer`.

References: Dong et al., "HAWQ: Hessian AWare Quantization of neural networks with mixed-precision",
ICCV 2019; Dong et al., "HAWQ-V2: Hessian aware trace-weighted quantization of neural networks",
NeurIPS 2020; Yao et al., "HAWQ-V3: Dyadic neural network quantization", ICML 2021; Shen et al.,
"Q-BERT: Hessian based ultra low precision quantization of BERT", AAAI 2020; Schaefer et al.,
"Augmenting Hessians with inter-layer dependencies for mixed-precision post-training
quantization", arXiv:2306.04879, 2023; Deng, Sharify, Wang & Orshansky, "Mixed-precision quantization for
deep vision models with integer quadratic programming" (CLADO), arXiv:2307.05657, DAC 2025.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from ..data import digits
from ..models import TinyTransformer
from ..quant.allocate import CostTable, Enumeration, allocate_bits_iqp, cost_table, exhaustive, knapsack
from ..quant.fake import LayerSwapper, quantizable_layers
from ..quant.sensitivity import (CrossLayerInteractions, PairInteractions, Sensitivities, cross_layer_interactions,
                                 pair_interactions, rank_correlation, sensitivities)
from .qbert import train_tiny_transformer
from .tasks import TrainedModel, digits_mlp, evaluate, trained_classifier

__all__ = [
    "CHOICES",
    "PROXIES",
    "HAWQProblem",
    "digits_problem",
    "all_sensitivities",
    "proxy_tables",
    "restrict",
    "enumerate_configs",
    "correlations",
    "BudgetComparison",
    "compare_at_budget",
    "seed_study",
    "transformer_problem",
    "CROSS_LAYER_MODELS",
    "cross_layer_tables",
    "OracleComparison",
    "oracle_comparison",
    "cross_layer_study",
]

CHOICES = (2, 3, 4, 8)
PROXIES = {  # display name: key of all_sensitivities() / proxy_tables()
    "HAWQ-V2: Tr(H)/n": "trace",
    "HAWQ: λ_max": "eigenvalue",
    "Q-BERT: |mean λ| + std λ": "qbert",
    "‖ΔW‖² only (no Hessian)": "weights",
    "measured, per layer": "measured",
    "measured + adjacent pairs": "pairs",
}
CROSS_LAYER_MODELS = {  # display name: key of cross_layer_tables(); every one measured, minimised exactly
    "per-layer additive": "additive",
    "adjacent pairs": "adjacent",
    "CLADO: all pairs": "clado",
    "CLADO + PSD (official code)": "clado_psd",
}


# --------------------------------------------------------------------------- the problem
@dataclass
class HAWQProblem:
    """A trained model (`trained`, a `tasks.TrainedModel`: model, train and test data, seed, training
    time) with what HAWQ measures it on: `criterion`, `calibration` (the Hessian and the measured
    losses, 256 training digits as in the pilot), `subsets` (Q-BERT's disjoint batches) and the
    quantizer: `granularity` and `symmetric` (default one symmetric range per output channel,
    HAWQ-V3's weight grid, which these studies keep; `hk.quant`'s default is asymmetric)."""

    trained: TrainedModel
    criterion: nn.Module
    calibration: tuple[Tensor, Tensor]
    subsets: list[tuple[Tensor, Tensor]]
    granularity: str = "channel"
    symmetric: bool = True

    @property
    def quantizer(self) -> dict[str, Any]:
        """The keyword arguments of the quantizer every study here passes to `hk.quant`."""
        return dict(granularity=self.granularity, symmetric=self.symmetric)

    @property
    def layers(self) -> list[str]:
        return list(quantizable_layers(self.trained.model))

    def accuracy(self, model: nn.Module | None = None) -> float:
        """Test accuracy (a fraction) of `model` (default: the trained one): `tasks.evaluate`'s."""
        return evaluate(self.trained.model if model is None else model, self.trained.test).accuracy


def digits_problem(seed: int = 0, width: int = 64, depth: int = 5, steps: int = 2000, lr: float = 1e-3,
                   batch_size: int = 64, calibration: int = 256, num_subsets: int = 5, subset_size: int = 128,
                   activation: str = "relu", granularity: str = "channel", symmetric: bool = True,
                   data_seed: int = 0) -> HAWQProblem:
    """Train `tasks.digits_mlp((width,) * depth, activation, seed)` on the digits with
    `tasks.trained_classifier` (Adam, `steps` mini-batches of `batch_size` drawn with replacement,
    seeded by `seed`; the train/test split by `data_seed`; `trained.train_seconds` is its wall time)
    and pick the calibration data: the first `calibration` training digits, and `num_subsets`
    disjoint batches of `subset_size` for Q-BERT (by default 256 samples and 5 x 128).
    `granularity` and `symmetric` are the quantizer of every study (default HAWQ-V3's symmetric
    per-channel grid)."""
    (x, y), test = digits(flatten=True, seed=data_seed)
    if num_subsets * subset_size > len(x) or calibration > len(x):
        raise ValueError(f"calibration, num_subsets, subset_size: need at most the {len(x)} training digits")
    trained = trained_classifier(digits_mlp((width,) * depth, activation, seed), (x, y), test, steps, lr,
                                 batch_size=batch_size, seed=seed, hidden=(width,) * depth, activation=activation,
                                 data_seed=data_seed)
    subsets = [(x[i * subset_size:(i + 1) * subset_size], y[i * subset_size:(i + 1) * subset_size])
               for i in range(num_subsets)]
    return HAWQProblem(trained, nn.CrossEntropyLoss(), (x[:calibration], y[:calibration]), subsets, granularity,
                       symmetric)


def transformer_problem(seed: int = 0, steps: int = 1000, calibration: int = 256, num_test: int = 512,
                        num_subsets: int = 5, subset_size: int = 128, granularity: str = "channel",
                        symmetric: bool = True, data_seed: int = 0) -> HAWQProblem:
    """Notebook 12's tiny transformer as a HAWQ problem: `qbert.train_tiny_transformer(seed, steps=steps,
    num_test=num_test, data_seed=data_seed)` (one pre-LN block on "which token is most frequent",
    AdamW, 1,000 steps by default) with its six quantizable layers (embedding, fused qkv, attention
    output, the two MLP layers, head: 4^6 configurations), the first `calibration` training
    sequences as calibration data and `num_subsets` disjoint batches of `subset_size` for Q-BERT.
    The test set is 512 sequences by default (notebook 12 uses 2,048), so that the enumeration of
    every configuration takes seconds; the quantizer is notebook 11's (symmetric, per channel)."""
    trained = train_tiny_transformer(seed=seed, steps=steps, num_test=num_test, data_seed=data_seed)
    x, y = trained.train
    if num_subsets * subset_size > len(x) or calibration > len(x):
        raise ValueError(f"calibration, num_subsets, subset_size: need at most the {len(x)} training sequences")
    subsets = [(x[i * subset_size:(i + 1) * subset_size], y[i * subset_size:(i + 1) * subset_size])
               for i in range(num_subsets)]
    return HAWQProblem(trained, nn.CrossEntropyLoss(), (x[:calibration], y[:calibration]), subsets, granularity,
                       symmetric)


def all_sensitivities(problem: HAWQProblem, choices: Sequence[int] = CHOICES, num_matvecs: int = 100, seed: int = 0,
                      metrics: Sequence[str] = ("trace", "eigenvalue", "qbert", "measured"), pairs: bool = True
                      ) -> tuple[dict[str, Sensitivities], PairInteractions | None]:
    """The `metrics` of `hk.quant.sensitivities` on the problem's calibration data (Q-BERT on its
    disjoint subsets; "measured" at every width) and, with `pairs`, the measured adjacent-pair
    interactions (None otherwise)."""
    m, c = problem.trained.model, problem.criterion
    unknown = set(metrics) - {"trace", "eigenvalue", "qbert", "measured"}
    if unknown:
        raise ValueError(f"metrics: unknown {sorted(unknown)}")
    make = {
        "trace": lambda: sensitivities(m, c, problem.calibration, "trace", num_matvecs=num_matvecs, seed=seed),
        "eigenvalue": lambda: sensitivities(m, c, problem.calibration, "eigenvalue", seed=seed),
        "qbert": lambda: sensitivities(m, c, problem.subsets, "qbert", num_subsets=len(problem.subsets), seed=seed),
        "measured": lambda: sensitivities(m, c, problem.calibration, "measured", bits=tuple(choices),
                                          **problem.quantizer),
    }
    units = len(metrics) + bool(pairs)  # progress (shown while an explorer renders): one unit per metric
    out = {}
    for k, key in enumerate(metrics, start=1):
        out[key] = make[key]()
        progress.report(k, units, f"sensitivities ({key})")
    interactions = pair_interactions(m, c, problem.calibration, choices, **problem.quantizer) \
        if pairs else None
    if pairs:
        progress.report(units, units, "sensitivities (adjacent pairs)")
    return out, interactions


def proxy_tables(problem: HAWQProblem, sens: Mapping[str, Sensitivities], pairs: PairInteractions | None = None,
                 choices: Sequence[int] = CHOICES) -> dict[str, CostTable]:
    """The cost table of every proxy (keys of `PROXIES`' values): the four metrics, "weights"
    (c_i = 1: Omega = ||dW||^2) and, with `pairs`, "pairs" (measured + adjacent interactions)."""
    kw = problem.quantizer
    tables = {key: cost_table(problem.trained.model, s, choices, **kw) for key, s in sens.items()}
    tables["weights"] = cost_table(problem.trained.model, {n: 1.0 for n in problem.layers}, choices, **kw)
    if pairs is not None and "measured" in sens:
        tables["pairs"] = cost_table(problem.trained.model, sens["measured"], choices, pairs=pairs, **kw)
    return tables


def restrict(table: CostTable, choices: Sequence[int]) -> CostTable:
    """The same costs for a subset of the widths."""
    cols = [table.choices.index(b) for b in sorted(choices)]
    pairs = None if table.pairs is None else table.pairs[:, cols][:, :, cols]
    cross = None if table.cross is None else table.cross[:, :, cols][:, :, :, cols]
    return CostTable(list(table.layers), tuple(sorted(choices)), table.omega[:, cols], table.num_params, pairs,
                     table.metric, cross)


# --------------------------------------------------------------------------- ground truth
Stage = Callable[[Any], Any]


def _sequential_plan(model: nn.Module, layers: list[str]) -> list[Stage] | None:
    """Stages of an nn.Sequential whose quantizable layers are direct children: stage i runs the
    children from layer i (from the input, for i = 0) up to layer i + 1 (to the output, for the last)."""
    if not isinstance(model, nn.Sequential):
        return None
    children = list(model.named_children())
    names = [name for name, _ in children]
    if not all(layer in names for layer in layers):
        return None
    modules = [m for _, m in children]
    bounds = [0] + [names.index(layer) for layer in layers[1:]] + [len(modules)]

    def segment(a: int, b: int) -> Stage:
        def run(h):
            for m in modules[a:b]:
                h = m(h)
            return h
        return run

    return [segment(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


TRANSFORMER_LAYERS = ["embed", "attn.qkv", "attn.out", "mlp.0", "mlp.2", "head"]


def _transformer_plan(model: nn.Module, layers: list[str]) -> list[Stage] | None:
    """Stages of `hk.models.TinyTransformer` (non-causal attention, its six layers in order), each
    ending where the next layer's weight is first used, written with the model's own modules:
    embedding + positions; LN1 and qkv; attention and its output projection with the residual;
    LN2, the first MLP layer and GELU; the second MLP layer, the residual, the final LN and the mean
    over positions; the head. The prefix enumeration's test checks them against the full forward."""
    if not isinstance(model, TinyTransformer) or layers != TRANSFORMER_LAYERS or model.attn.causal:
        return None
    m = model

    def embed(tokens):
        return m.embed(tokens) + m.position[: tokens.shape[1]]

    def qkv(h):
        return h, m.attn.qkv(m.norm1(h))

    def attention(state):
        h, projected = state
        b, t, d = h.shape
        q, k, v = projected.reshape(b, t, 3, m.attn.heads, d // m.attn.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // m.attn.heads), dim=-1)
        return h + m.attn.out((weights @ v).transpose(1, 2).reshape(b, t, d))

    def mlp_in(h):
        return h, m.mlp[1](m.mlp[0](m.norm2(h)))

    def mlp_out(state):
        h, u = state
        return m.norm_out(h + m.mlp[2](u)).mean(dim=1)

    return [embed, qkv, attention, mlp_in, mlp_out, m.head]


def enumerate_configs(problem: HAWQProblem, choices: Sequence[int] = CHOICES) -> Enumeration:
    """Every configuration's calibration loss ("loss", and "delta" = its change from the float
    model) and test accuracy ("accuracy").

    For an nn.Sequential (the digits MLP) and `hk.models.TinyTransformer` (notebook 12's) it shares
    prefixes: the model runs in stages, one per quantizable layer, and the state after layers
    1..i for a prefix of widths is computed once for all |B|^(L-i) configurations that start with
    it (depth-first), so 4^6 configurations cost about 1/10 of 4,096 full forward passes (the
    transformer's head, applied last to the pooled features, is nearly free), with results equal to
    `hesskit.quant.allocate.exhaustive` (tested: the same modules on the same tensors). Other models
    go through `hesskit.quant.allocate.exhaustive`."""
    choices = tuple(sorted(choices))
    inputs = {"loss": problem.calibration, "test": problem.trained.test}
    plans = (_sequential_plan, _transformer_plan)
    if all(plan(problem.trained.model, problem.layers) is None for plan in plans):
        return _enumerate_exhaustive(problem, choices, inputs)
    swapper = LayerSwapper(problem.trained.model, problem.layers, choices, mode="eval", **problem.quantizer)
    stages = next(s for s in (plan(swapper.model, problem.layers) for plan in plans) if s is not None)
    return _enumerate_prefixes(problem, choices, inputs, swapper, stages)


def _config_metrics(criterion: nn.Module, inputs: Mapping[str, tuple[Tensor, Tensor]],
                    out: Mapping[str, Tensor]) -> dict[str, float]:
    """The calibration loss and test accuracy of one configuration from its outputs on `inputs`."""
    return {"loss": float(criterion(out["loss"], inputs["loss"][1])),
            "accuracy": float((out["test"].argmax(dim=1) == inputs["test"][1]).double().mean())}


def _leaf_metrics(criterion: nn.Module, inputs: Mapping[str, tuple[Tensor, Tensor]],
                  outs: list[Mapping[str, Tensor]]) -> list[dict[str, float]]:
    """_config_metrics() of several outputs at once (one loss call per width of the last layer saved)."""
    if not isinstance(criterion, nn.CrossEntropyLoss) or criterion.weight is not None:
        return [_config_metrics(criterion, inputs, o) for o in outs]
    logits = torch.stack([o["loss"] for o in outs])
    y = inputs["loss"][1]
    losses = nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(len(outs)), reduction="none",
                                         ignore_index=criterion.ignore_index,
                                         label_smoothing=criterion.label_smoothing).view(len(outs), -1).mean(1)
    hits = (torch.stack([o["test"] for o in outs]).argmax(dim=2) == inputs["test"][1]).double().mean(1)
    return [{"loss": float(a), "accuracy": float(b)} for a, b in zip(losses, hits)]


def _enumerate_exhaustive(problem: HAWQProblem, choices: tuple[int, ...],
                          inputs: Mapping[str, tuple[Tensor, Tensor]]) -> Enumeration:
    """`enumerate_configs` for any model: `hesskit.quant.allocate.exhaustive`, one full forward pass each."""
    def config_metrics(m):
        with torch.no_grad():
            return _config_metrics(problem.criterion, inputs, {k: m(x) for k, (x, _) in inputs.items()})
    e = exhaustive(problem.trained.model, choices, config_metrics, **problem.quantizer)
    e.values["delta"] = e.values["loss"] - e.baseline["loss"]
    return e


def _enumerate_prefixes(problem: HAWQProblem, choices: tuple[int, ...], inputs: Mapping[str, tuple[Tensor, Tensor]],
                        swapper: LayerSwapper, stages: list[Stage]) -> Enumeration:
    """`enumerate_configs` by stages: depth-first over the layers' widths on the swapper's working
    copy, the state after each prefix computed once."""
    criterion, layers = problem.criterion, problem.layers
    results: list[dict[str, float]] = []

    def run(i: int, states: Mapping[str, Any]) -> dict[str, Any]:
        return {k: stages[i](h) for k, h in states.items()}

    with torch.no_grad():
        swapper.apply({})
        start = {k: x for k, (x, _) in inputs.items()}
        out = start
        for i in range(len(stages)):
            out = run(i, out)
        baseline = _config_metrics(criterion, inputs, out)

        def descend(i: int, prefix: dict[str, int], states: Mapping[str, Any]) -> None:
            leaves = []
            for b in choices:
                swapper.apply({**prefix, layers[i]: b})
                out = run(i, states)
                if i + 1 == len(layers):
                    leaves.append(out)
                else:
                    descend(i + 1, {**prefix, layers[i]: b}, out)
            results.extend(_leaf_metrics(criterion, inputs, leaves) if leaves else [])

        descend(0, {}, start)
    configs = np.array(list(itertools.product(choices, repeat=len(layers))), dtype=np.int64)
    values = {key: np.array([r[key] for r in results]) for key in results[0]}
    values["delta"] = values["loss"] - baseline["loss"]
    modules = quantizable_layers(problem.trained.model)
    n = np.array([modules[name].weight.numel() for name in layers], dtype=np.int64)
    return Enumeration(layers, choices, configs, values, configs @ n, int(n.sum()), baseline)


def correlations(tables: Mapping[str, CostTable], enumeration: Enumeration, key: str = "delta") -> dict[str, float]:
    """Spearman rho between each proxy's predicted Omega and the measured `key` over every
    enumerated configuration (HAWQ's objective is a ranking device: rho is what matters)."""
    truth = enumeration.values[key]
    return {name: rank_correlation(table.predict(enumeration.configs), truth) for name, table in tables.items()}


# --------------------------------------------------------------------------- one budget
@dataclass
class BudgetComparison:
    """Test accuracy at one budget (average bits per weight) and set of widths: each proxy's
    exact allocation (`chosen[proxy]` = (config, accuracy)), uniform precision (the largest width
    that fits), random configurations using 85-100% of the budget (the exact median and quartiles
    over ALL of them, from the enumeration), and the exhaustive best (an oracle: chosen on the
    test set itself)."""

    avg_bits: float
    choices: tuple[int, ...]
    float_accuracy: float
    chosen: dict[str, tuple[dict[str, int], float]]
    uniform: tuple[int, float] | None
    random_median: float
    random_quartiles: tuple[float, float]
    num_random: int
    best: tuple[dict[str, int], float]
    predicted: dict[str, float] = field(default_factory=dict)


def compare_at_budget(tables: Mapping[str, CostTable], enumeration: Enumeration, avg_bits: float,
                      choices: Sequence[int] | None = None, min_fill: float = 0.85) -> BudgetComparison:
    """Allocate with every proxy at `avg_bits` (exact DP) and look the accuracies up in the
    enumeration (see `BudgetComparison`). Raises ValueError if nothing fits."""
    choices = tuple(sorted(enumeration.choices if choices is None else choices))
    chosen, predicted = {}, {}
    for name, table in tables.items():
        allocation = knapsack(restrict(table, choices), avg_bits)
        chosen[name] = (dict(allocation), enumeration.value(allocation, "accuracy"))
        predicted[name] = allocation.predicted
    fits = [b for b in choices if b <= avg_bits]
    uniform = None
    if fits:
        b = max(fits)
        uniform = (b, enumeration.value({n: b for n in enumeration.layers}, "accuracy"))
    mask = enumeration.feasible(avg_bits, min_fill=min_fill, choices=choices)
    acc = enumeration.values["accuracy"][mask]
    median = float(np.median(acc)) if len(acc) else math.nan
    quartiles = (float(np.percentile(acc, 25)), float(np.percentile(acc, 75))) if len(acc) else (math.nan, math.nan)
    best = enumeration.best(avg_bits, key="accuracy", maximize=True, choices=choices)
    return BudgetComparison(float(avg_bits), choices, float(enumeration.baseline["accuracy"]), chosen, uniform,
                            median, quartiles, int(mask.sum()), best, predicted)


def seed_study(seeds: Sequence[int], avg_bits: Sequence[float] = (2.5, 3.0),
               proxies: Sequence[str] = ("trace", "pairs"), num_matvecs: int = 100,
               cross_layer_bits: Sequence[float] = (), **problem_kwargs: Any) -> dict[str, Any]:
    """Repeat train -> sensitivities -> enumeration -> `compare_at_budget` for several seeds.
    Seed s trains `digits_problem(seed=s, **problem_kwargs)` and draws the probes of
    `all_sensitivities(..., num_matvecs, seed=s)`, so a walk-through of one seed that does the same
    reproduces its row exactly. Returns arrays (seeds, budgets): "float", "uniform", "random",
    "best" and one per proxy, plus "rho_<proxy>" (seeds,) rank correlations and "seeds" (seeds,).
    With `cross_layer_bits` (budgets), "cross_layer" holds what `cross_layer_study("digits", seeds,
    cross_layer_bits, **problem_kwargs)` returns, from the same trained models and enumerations."""
    rows: dict[str, list] = {}
    cross_rows: dict[str, list] = {}
    seeds = list(seeds)
    for j, seed in enumerate(seeds):
        progress.report(j, len(seeds), "seed")  # shown while an explorer renders
        problem = digits_problem(seed=seed, **problem_kwargs)
        needed = [k for k in ("trace", "eigenvalue", "qbert") if k in proxies]
        needed += ["measured"] if {"measured", "pairs"} & set(proxies) else []
        sens, pairs = all_sensitivities(problem, num_matvecs=num_matvecs, seed=seed, metrics=needed,
                                        pairs="pairs" in proxies)
        tables = proxy_tables(problem, sens, pairs)
        e = enumerate_configs(problem)
        if cross_layer_bits:
            _cross_layer_rows(cross_rows, problem, e, cross_layer_bits, CHOICES)
        rho = correlations(tables, e)
        for p in proxies:
            rows.setdefault(f"rho_{p}", []).append(rho[p])
        per_budget: dict[str, list] = {}
        for b in avg_bits:
            c = compare_at_budget({p: tables[p] for p in proxies}, e, b)
            per_budget.setdefault("float", []).append(c.float_accuracy)
            per_budget.setdefault("uniform", []).append(c.uniform[1] if c.uniform else math.nan)
            per_budget.setdefault("random", []).append(c.random_median)
            per_budget.setdefault("best", []).append(c.best[1])
            for p in proxies:
                per_budget.setdefault(p, []).append(c.chosen[p][1])
        for k, v in per_budget.items():
            rows.setdefault(k, []).append(v)
    progress.report(len(seeds), len(seeds), "seed")
    out: dict[str, Any] = {k: np.array(v) for k, v in rows.items()}
    out["seeds"] = np.array(seeds)
    if cross_layer_bits:
        out["cross_layer"] = _cross_layer_result(cross_rows, seeds, cross_layer_bits)
    return out


# --------------------------------------------------------------------------- cross-layer terms (CLADO)
def cross_layer_tables(problem: HAWQProblem, choices: Sequence[int] = CHOICES
                       ) -> tuple[CrossLayerInteractions, dict[str, CostTable]]:
    """CLADO's measurements on the problem's calibration data (`hk.quant.cross_layer_interactions`:
    every layer alone and every pair of layers together, at every width) and the three models they
    give, keyed as `CROSS_LAYER_MODELS`: "additive" (the measured single-layer losses alone),
    "adjacent" (plus the terms of consecutive layers: `PairInteractions`, the same numbers) and
    "clado" (plus the terms of every pair); "clado_psd" is the "clado" table, which
    `oracle_comparison` minimises after CLADO's PSD projection."""
    model = problem.trained.model
    cross = cross_layer_interactions(model, problem.criterion, problem.calibration, tuple(choices),
                                     **problem.quantizer)
    full = cost_table(model, cross, tuple(choices), **problem.quantizer)
    additive = CostTable(list(full.layers), full.choices, full.omega, full.num_params, metric="measured")
    adjacent = cost_table(model, cross.adjacent(), tuple(choices), **problem.quantizer)
    return cross, {"additive": additive, "adjacent": adjacent, "clado": full, "clado_psd": full}


@dataclass
class OracleComparison:
    """Each model's exact allocation at one budget against the exhaustive oracle: the configuration
    of least measured calibration loss among the `num_feasible` that fit `avg_bits` (what every
    model predicts and minimises). `chosen[key]` = (config, rank, delta, accuracy): its rank among
    the feasible configurations by measured loss (1 = the oracle's loss; ties share the better
    rank), its measured loss change and test accuracy; `oracle` = (config, delta, accuracy);
    `predicted[key]` the model's value at its choice."""

    avg_bits: float
    num_feasible: int
    oracle: tuple[dict[str, int], float, float]
    chosen: dict[str, tuple[dict[str, int], int, float, float]]
    predicted: dict[str, float] = field(default_factory=dict)

    def rank(self, key: str) -> int:
        return self.chosen[key][1]

    def gap(self, key: str) -> float:
        """Test accuracy of the model's choice minus the oracle's (a fraction; 0 when it is the oracle)."""
        return self.chosen[key][3] - self.oracle[2]


def oracle_comparison(tables: Mapping[str, CostTable], enumeration: Enumeration, avg_bits: float,
                      psd: Sequence[str] = ("clado_psd",)) -> OracleComparison:
    """Minimise every table exactly under `avg_bits` (`hk.quant.allocate_bits_iqp`, a MILP; with
    CLADO's PSD projection for the keys in `psd`, without it for the others, which is the exact
    minimiser of the table: the knapsack DP's for additive and adjacent tables) and look each choice
    up in the enumeration (see `OracleComparison`)."""
    delta, accuracy = enumeration.values["delta"], enumeration.values["accuracy"]
    mask = enumeration.feasible(avg_bits)
    if not mask.any():
        raise ValueError(f"avg_bits: no configuration fits {avg_bits} bits per weight")
    k = int(np.argmin(np.where(mask, delta, np.inf)))
    chosen, predicted = {}, {}
    for key, table in tables.items():
        allocation = allocate_bits_iqp(table, avg_bits, psd=key in psd)
        i = enumeration.index(allocation)
        chosen[key] = (dict(allocation), int((delta[mask] < delta[i]).sum()) + 1, float(delta[i]), float(accuracy[i]))
        predicted[key] = allocation.predicted
    return OracleComparison(float(avg_bits), int(mask.sum()), (enumeration.config(k), float(delta[k]),
                                                               float(accuracy[k])), chosen, predicted)


def cross_layer_study(task: str, seeds: Sequence[int], avg_bits: Sequence[float] = (2.5, 2.75, 3.0, 3.25, 3.5),
                      choices: Sequence[int] = CHOICES, **problem_kwargs: Any) -> dict[str, np.ndarray]:
    """For every seed: train the `task`'s model ("digits": `digits_problem`, "transformer":
    `transformer_problem`, with `problem_kwargs`), measure CLADO's terms (`cross_layer_tables`),
    enumerate all configurations and compare every model with the oracle at every budget
    (`oracle_comparison`). Returns arrays (seeds, budgets) "rank_<key>" and "gap_<key>" (test
    accuracy minus the oracle's, a fraction) per key of `CROSS_LAYER_MODELS`, "num_feasible",
    "oracle_accuracy"; (seeds,) "rho_<key>" (Spearman rho of the model's prediction against the
    measured loss change over every configuration; "clado_psd" has none: it ranks nothing, it only
    changes what is minimised), "float_accuracy", "evaluations" (the loss evaluations CLADO's
    measurement took) and "seeds"; "avg_bits" (budgets,)."""
    make = {"digits": digits_problem, "transformer": transformer_problem}
    if task not in make:
        raise ValueError(f"task: expected one of {sorted(make)}, got {task!r}")
    seeds = list(seeds)
    rows: dict[str, list] = {}
    for j, seed in enumerate(seeds):
        progress.report(j, len(seeds), "seed")  # shown while an explorer renders
        problem = make[task](seed=seed, **problem_kwargs)
        _cross_layer_rows(rows, problem, enumerate_configs(problem, choices), avg_bits, choices)
    progress.report(len(seeds), len(seeds), "seed")
    return _cross_layer_result(rows, seeds, avg_bits)


def _cross_layer_rows(rows: dict[str, list], problem: HAWQProblem, enumeration: Enumeration,
                      avg_bits: Sequence[float], choices: Sequence[int]) -> None:
    """Append one seed's row of `cross_layer_study` to `rows`."""
    cross, tables = cross_layer_tables(problem, choices)
    truth = enumeration.values["delta"]
    for key in CROSS_LAYER_MODELS.values():
        if key != "clado_psd":
            rows.setdefault(f"rho_{key}", []).append(rank_correlation(tables[key].predict(enumeration.configs), truth))
    comparisons = [oracle_comparison(tables, enumeration, b) for b in avg_bits]
    for key in CROSS_LAYER_MODELS.values():
        rows.setdefault(f"rank_{key}", []).append([c.rank(key) for c in comparisons])
        rows.setdefault(f"gap_{key}", []).append([c.gap(key) for c in comparisons])
    rows.setdefault("num_feasible", []).append([c.num_feasible for c in comparisons])
    rows.setdefault("oracle_accuracy", []).append([c.oracle[2] for c in comparisons])
    rows.setdefault("float_accuracy", []).append(enumeration.baseline["accuracy"])
    rows.setdefault("evaluations", []).append(cross.num_evaluations)


def _cross_layer_result(rows: Mapping[str, list], seeds: Sequence[int], avg_bits: Sequence[float]
                        ) -> dict[str, np.ndarray]:
    out = {k: np.array(v) for k, v in rows.items()}
    out["seeds"], out["avg_bits"] = np.array(list(seeds)), np.array([float(b) for b in avg_bits])
    return out
