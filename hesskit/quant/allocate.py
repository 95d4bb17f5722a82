"""Bit allocation: choose a width b_i in a set B for every layer under a budget.

Every allocator here minimises the additive HAWQ objective

    Omega(b) = sum_i Omega_i(b_i),     Omega_i(b) = c_i ||Q_b(W_i) - W_i||^2

(c_i = Tr(H_i)/n_i for HAWQ-V2, lambda_max(H_i) for HAWQ, or a measured loss change in place of
Omega_i) subject to additive resource limits sum_i r_i(b_i) <= R: the size sum_i n_i b_i (in weight
bits; `avg_bits` means sum_i n_i b_i <= avg_bits sum_i n_i, HAWQ's "average bits"), bit operations
sum_i MACs_i b_i b_a (HAWQ-V3's BOPs), a latency table.

- `pareto_frontier` / `allocate_bits`: one size constraint, solved EXACTLY by dynamic programming
  over the multiple-choice knapsack (HAWQ-V2's Pareto frontier of (size, Omega); the authors'
  ZeroQ answer used size bins, amirgholami/ZeroQ#3). Sizes are integers (n_i b), so no binning is
  needed: the DP keeps, after each layer, the Pareto-optimal (size, Omega) pairs of the layers so
  far, at exact integer sizes; one pass gives the whole frontier.
- `allocate_bits_ilp`: several constraints, as HAWQ-V3 (Yao et al., ICML 2021), an integer linear
  program with one-hot x_i^b solved by `scipy.optimize.milp` (HiGHS) instead of PuLP/GLPK.
- `allocate_bits_iqp`: CLADO (Deng et al., arXiv:2307.05657), the objective with measured terms for
  EVERY pair of layers, x^T G x over one-hot x, an integer quadratic program; solved exactly as a
  MILP with one product variable per pair of choices of two layers, or by enumeration.
- `bisection_search`: Schaefer et al. (2023)'s search for a cut point in a sensitivity order whose
  accuracy drop lies inside a user's window, O(log L) evaluations.
- `exhaustive`: every one of the |B|^L configurations (ground truth, when that is ~1e4 or fewer).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn

from .._batches import num_samples
from .._checks import is_int, is_real
from .._model import call_model, eval_mode
from ..layers import is_linear, linear_weight
from .fake import (LayerSwapper, check_bits, check_choices, check_layers, layer_weight, quantizable_layers,
                   quantization_error, weight_users)
from .sensitivity import CrossLayerInteractions, PairInteractions, Sensitivities

__all__ = [
    "CostTable",
    "cost_table",
    "Allocation",
    "ParetoFrontier",
    "pareto_frontier",
    "allocate_bits",
    "knapsack",
    "size_limit",
    "interpolated_limit",
    "layer_macs",
    "bops_table",
    "allocate_bits_ilp",
    "allocate_bits_iqp",
    "psd_part",
    "fine_tuning_order",
    "Enumeration",
    "exhaustive",
    "random_configs",
    "BisectionResult",
    "bisection_search",
]


# ----------------------------------------------------------------------------- the cost table
@dataclass
class CostTable:
    """Omega_i(b) for every layer i and width b in `choices`, with the layer sizes n_i.

    `omega[i, j]` is the cost of layer i at width choices[j]; `pairs[i][j, k]`, when present, is
    added for layer i at choices[j] and layer i + 1 at choices[k] (measured interactions,
    `hk.quant.pair_interactions`); `cross[i, l][j, k]`, when present, is added for EVERY pair of
    layers i < l (CLADO's cross-layer terms, `hk.quant.cross_layer_interactions`; symmetric, zero
    blocks on the diagonal; only `allocate_bits_iqp` minimises it). `size[i, j] = n_i choices[j]`,
    exact integers (weight bits)."""

    layers: list[str]
    choices: tuple[int, ...]
    omega: np.ndarray  # (L, B) float64
    num_params: np.ndarray  # (L,) int64
    pairs: np.ndarray | None = None  # (L - 1, B, B)
    metric: str = ""
    cross: np.ndarray | None = None  # (L, L, B, B)

    def __post_init__(self):
        self.choices = tuple(int(b) for b in self.choices)
        self.omega = np.asarray(self.omega, dtype=float)
        self.num_params = np.asarray(self.num_params, dtype=np.int64)
        L, B = len(self.layers), len(self.choices)
        if self.omega.shape != (L, B) or self.num_params.shape != (L,):
            raise ValueError(f"omega, num_params: expected shapes ({L}, {B}) and ({L},), got "
                             f"{self.omega.shape} and {self.num_params.shape}")
        if not np.isfinite(self.omega).all():
            raise ValueError("omega: contains nan or inf")
        if (self.num_params <= 0).any():
            raise ValueError("num_params: expected positive layer sizes")
        if self.pairs is not None:
            self.pairs = np.asarray(self.pairs, dtype=float)
            if self.pairs.shape != (max(L - 1, 0), B, B) or not np.isfinite(self.pairs).all():
                raise ValueError(f"pairs: expected finite values of shape ({max(L - 1, 0)}, {B}, {B}), "
                                 f"got {self.pairs.shape}")
        if self.cross is not None:
            if self.pairs is not None:
                raise ValueError("pairs, cross: expected adjacent pair terms or all-pairs terms, not both "
                                 "(all pairs include the adjacent ones)")
            self.cross = np.asarray(self.cross, dtype=float)
            if self.cross.shape != (L, L, B, B) or not np.isfinite(self.cross).all():
                raise ValueError(f"cross: expected finite values of shape ({L}, {L}, {B}, {B}), got {self.cross.shape}")
            if not np.allclose(self.cross, self.cross.transpose(1, 0, 3, 2), rtol=1e-12, atol=0):
                raise ValueError("cross: expected symmetric terms, cross[i, l][j, k] = cross[l, i][k, j]")
            if L and np.abs(self.cross[np.arange(L), np.arange(L)]).max() > 0:
                raise ValueError("cross: expected zero blocks cross[i, i] (a layer has one width)")

    @classmethod
    def from_arrays(cls, omega: Any, choices: Sequence[int], num_params: Sequence[int],
                    layers: Sequence[str] | None = None, pairs: Any = None, cross: Any = None) -> CostTable:
        """A table from plain arrays (layers named "0", "1", ... unless given)."""
        omega = np.asarray(omega, dtype=float)
        if omega.ndim != 2:
            raise ValueError(f"omega: expected a 2-D (layers, choices) array, got shape {omega.shape}")
        names = [str(i) for i in range(omega.shape[0])] if layers is None else list(layers)
        return cls(names, tuple(choices), omega, np.asarray(num_params), pairs, cross=cross)

    @property
    def size(self) -> np.ndarray:
        """Weight bits n_i b of each (layer, width): exact integers."""
        return self.num_params[:, None] * np.array(self.choices, dtype=np.int64)[None, :]

    @property
    def total_params(self) -> int:
        return int(self.num_params.sum())

    def indices(self, configs: Any) -> np.ndarray:
        """Choice indices (K, L) of configurations given as {layer: bits} or a (K, L) array of bits."""
        if isinstance(configs, Mapping):
            configs = [[configs[name] for name in self.layers]]
        bits = np.atleast_2d(np.asarray(configs))
        if bits.shape[1] != len(self.layers):
            raise ValueError(f"configs: expected {len(self.layers)} widths per configuration, got {bits.shape[1]}")
        lookup = {b: j for j, b in enumerate(self.choices)}
        try:
            return np.vectorize(lambda b: lookup[int(b)], otypes=[np.int64])(bits)
        except KeyError as exc:
            raise ValueError(f"configs: width {exc.args[0]} is not among the choices {self.choices}") from None

    def predict(self, configs: Any) -> np.ndarray:
        """Omega of each configuration (the additive costs plus the pair terms, if any)."""
        idx = self.indices(configs)
        rows = np.arange(len(self.layers))
        total = self.omega[rows[None, :], idx].sum(axis=1)
        if self.pairs is not None and len(self.layers) > 1:
            total = total + self.pairs[rows[None, :-1], idx[:, :-1], idx[:, 1:]].sum(axis=1)
        if self.cross is not None and len(self.layers) > 1:
            i, j = np.triu_indices(len(self.layers), 1)
            total = total + self.cross[i[None, :], j[None, :], idx[:, i], idx[:, j]].sum(axis=1)
        return total

    def matrix(self) -> np.ndarray:
        """The objective as CLADO's quadratic form: the symmetric (L |B|, L |B|) matrix G with
        x^T G x = `predict` for the one-hot vector x of a configuration (x[i |B| + j] = 1 when layer
        i takes choices[j]). Diagonal: omega; the block of layers (i, l): half their pair terms
        (adjacent or all pairs); other entries of a layer's own block: 0. CLADO's official code
        builds 2 G (the diagonal 2 D_i, the blocks the full terms), the same minimiser."""
        L, B = self.omega.shape
        G = np.diag(self.omega.ravel()).reshape(L, B, L, B)
        if self.cross is not None:
            G = G + 0.5 * self.cross.transpose(0, 2, 1, 3)
        if self.pairs is not None:
            for i in range(L - 1):
                G[i, :, i + 1, :] += 0.5 * self.pairs[i]
                G[i + 1, :, i, :] += 0.5 * self.pairs[i].T
        return G.reshape(L * B, L * B)

    def weight_bits(self, configs: Any) -> np.ndarray:
        idx = self.indices(configs)
        return self.size[np.arange(len(self.layers))[None, :], idx].sum(axis=1)


def cost_table(model: nn.Module, sensitivities: Any, choices: Sequence[int] = (2, 3, 4, 8), *,
               granularity: str | None = None, group_size: int | None = None, symmetric: bool = False,
               pairs: PairInteractions | CrossLayerInteractions | None = None) -> CostTable:
    """HAWQ's costs Omega_i(b) = c_i ||Q_b(W_i) - W_i||^2 of each layer at each width.

    `sensitivities`: a `Sensitivities` (c_i is its `.curvature`: Tr(H_i)/n_i, lambda_max(H_i), or
    Q-BERT's statistic; a "measured" one gives Omega_i(b) = the measured loss change, which must
    cover every width in `choices`), a `CostTable` (returned, checked), or a plain {layer: c_i}
    mapping (e.g. all ones: the curvature-free ||dW||^2 baseline). The layers are those of the
    mapping, in model order. `pairs` adds measured interactions: of adjacent layers
    (`hk.quant.pair_interactions`, minimised exactly by the DP) or of every pair (CLADO,
    `hk.quant.cross_layer_interactions`, minimised by `allocate_bits_iqp`); the layers and choices
    must match. A `PairInteractions` or `CrossLayerInteractions` passed as `sensitivities` is both:
    its measured single-layer losses are Omega and its terms the pairs (CLADO's objective:
    `cost_table(model, hk.quant.cross_layer_interactions(model, criterion, data))`).

    Defaults: `choices` (2, 3, 4, 8), hesskit's: the weight widths of Q-BERT's tables (HAWQ-V3 mixes
    4 and 8 only, for its integer kernels); `granularity`, `group_size`, `symmetric`:
    `hk.quant.fake_quantize`'s (one asymmetric range per output channel), which `quantize_model`
    uses too, so the costs are those of the model it will build."""
    choices = check_choices(choices, symmetric)
    if isinstance(sensitivities, CostTable):
        if sensitivities.choices != choices:
            raise ValueError(f"choices: the cost table has {sensitivities.choices}, got {choices}")
        return sensitivities
    if isinstance(sensitivities, (PairInteractions, CrossLayerInteractions)):
        if pairs is not None and pairs is not sensitivities:
            raise ValueError("pairs: the sensitivities are measured interactions already; pass them once")
        return _interaction_table(model, sensitivities, choices)
    if not isinstance(sensitivities, Mapping) or not sensitivities:
        raise TypeError(f"sensitivities: expected a Sensitivities or {{layer: value}} mapping, got {sensitivities!r}")
    modules = check_layers(model, list(sensitivities))
    names = list(modules)
    metric = getattr(sensitivities, "metric", "")
    sizes = np.array([modules[n].weight.numel() for n in names])
    if metric == "measured":
        table = sensitivities.table or {}
        missing = [(n, b) for n in names for b in choices if b not in table.get(n, {})]
        if missing:
            raise ValueError(f"sensitivities: the measured table lacks widths {sorted({b for _, b in missing})}; "
                             f"measure them with sensitivities(..., metric='measured', bits={choices})")
        omega = np.array([[table[n][b] for b in choices] for n in names])
    else:
        factor = sensitivities.curvature if isinstance(sensitivities, Sensitivities) and metric else sensitivities
        c = np.array([float(factor[n]) for n in names])
        if not np.isfinite(c).all():
            raise ValueError("sensitivities: contain nan or inf")
        errors = np.array([[quantization_error(layer_weight(modules[n]), b, symmetric, granularity, group_size)
                            for b in choices] for n in names])
        omega = c[:, None] * errors
    pair_terms = cross = None
    if pairs is not None:
        if not isinstance(pairs, (PairInteractions, CrossLayerInteractions)):
            raise TypeError(f"pairs: expected a PairInteractions (hk.quant.pair_interactions) or a "
                            f"CrossLayerInteractions (hk.quant.cross_layer_interactions), got {type(pairs).__name__}")
        if list(pairs.layers) != names or tuple(pairs.choices) != choices:
            raise ValueError(f"pairs: measured for layers {pairs.layers} and choices {pairs.choices}, "
                             f"but the table has {names} and {choices}")
        if isinstance(pairs, CrossLayerInteractions):
            cross = pairs.terms
        else:
            pair_terms = pairs.terms
    return CostTable(names, choices, omega, sizes, pair_terms, metric, cross)


def _interaction_table(model: nn.Module, measured: PairInteractions | CrossLayerInteractions,
                       choices: tuple[int, ...]) -> CostTable:
    """The table of measured interactions: their single-layer losses as Omega, their terms as pairs."""
    if tuple(measured.choices) != choices:
        raise ValueError(f"choices: the interactions were measured for {measured.choices}, got {choices}")
    modules = check_layers(model, list(measured.layers))
    if list(modules) != list(measured.layers):
        raise ValueError(f"sensitivities: layers {measured.layers} are not in model order {list(modules)}")
    sizes = np.array([modules[n].weight.numel() for n in modules])
    cross = isinstance(measured, CrossLayerInteractions)
    return CostTable(list(modules), choices, measured.singles, sizes, None if cross else measured.terms, "measured",
                     measured.terms if cross else None)


# ----------------------------------------------------------------------------- exact DP
def _envelope(size: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Indices of the lower envelope: sorted by size, each with a strictly smaller Omega than
    every smaller-or-equal size before it."""
    order = np.lexsort((omega, size))
    o = omega[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], o[:-1]]))
    return order[o < best_before]


def _pareto_dp(table: CostTable, cap: int | None = None):
    """Exact Pareto DP. DP_i = the non-dominated (size, Omega) pairs of layers 0..i, extended by
    every width of layer i + 1 (with pair terms, one envelope per width of the last layer, since
    the next pair term depends on it); states that cannot fit under `cap` are dropped.

    Returns (sizes, omegas, choice indices (P, L)) of the final envelope."""
    if table.cross is not None:
        raise ValueError("costs: terms for every pair of layers (CLADO) are not a chain, which the DP needs; "
                         "minimise them with allocate_bits_iqp")
    L = len(table.layers)
    S, O, P = table.size, table.omega, table.pairs
    min_rest = np.concatenate([np.cumsum(S.min(axis=1)[::-1])[::-1], [0]])  # smallest size of layers i..L-1
    size, omega = S[0].copy(), O[0].copy()
    last = np.arange(S.shape[1])
    history = []  # per layer: (parent index, choice) of each state
    parent = np.full(len(size), -1)
    for i in range(L):
        if i > 0:
            B = S.shape[1]
            size = (size[:, None] + S[i][None, :]).ravel()
            step = omega[:, None] + O[i][None, :]
            if P is not None:
                step = step + P[i - 1][last]
            omega = step.ravel()
            parent = np.repeat(np.arange(len(last)), B)
            last = np.tile(np.arange(B), len(last))
        keep = np.ones(len(size), dtype=bool) if cap is None else size + min_rest[i + 1] <= cap
        idx = np.flatnonzero(keep)
        if P is not None and i < L - 1:
            idx = np.concatenate([idx[last[idx] == b][_envelope(size[idx[last[idx] == b]], omega[idx[last[idx] == b]])]
                                  for b in range(S.shape[1])])
        else:
            idx = idx[_envelope(size[idx], omega[idx])]
        size, omega, last, parent = size[idx], omega[idx], last[idx], parent[idx]
        history.append((parent, last))
    configs = np.zeros((len(size), L), dtype=np.int64)
    pointer = np.arange(len(size))
    for i in range(L - 1, -1, -1):
        parent_i, choice_i = history[i]
        configs[:, i] = choice_i[pointer]
        pointer = parent_i[pointer]
    return size, omega, configs


class Allocation(dict):
    """{layer: bits} chosen by an allocator, with `predicted` (its Omega), `weight_bits`
    (sum n_i b_i), `average_bits` and, for the ILP and the IQP, `resources` {name: (used, limit)}."""

    def __init__(self, config: Mapping[str, int] = (), *, predicted: float = math.nan, weight_bits: int = 0,
                 average_bits: float = math.nan, resources: Mapping[str, tuple[float, float]] | None = None,
                 method: str = ""):
        super().__init__(config)
        self.predicted = predicted
        self.weight_bits = weight_bits
        self.average_bits = average_bits
        self.resources = dict(resources or {})
        self.method = method

    def __repr__(self) -> str:
        return f"Allocation({dict(self)}, average_bits={self.average_bits:.3f}, predicted={self.predicted:.4g})"


def size_limit(table: CostTable, avg_bits: float) -> int:
    """The largest total weight bits allowed by `avg_bits` per weight: floor(avg_bits * sum n_i),
    computed exactly (the float avg_bits as a fraction), so the budget is respected exactly."""
    if not is_real(avg_bits) or not math.isfinite(avg_bits):
        raise ValueError(f"avg_bits: expected a finite number of bits per weight, got {avg_bits!r}")
    if avg_bits < min(table.choices):
        raise ValueError(f"avg_bits: {avg_bits} is below the smallest choice {min(table.choices)}; no "
                         f"configuration of widths {table.choices} fits")
    return math.floor(Fraction(avg_bits) * table.total_params)


@dataclass
class ParetoFrontier:
    """The lower envelope of (size, Omega) over all configurations: for each size, no other
    configuration is both smaller and better. `weight_bits[p]` (increasing) and `omega[p]`
    (decreasing) of frontier point p, its widths `configs[p]` (bits, in `layers` order)."""

    layers: list[str]
    choices: tuple[int, ...]
    weight_bits: np.ndarray
    omega: np.ndarray
    configs: np.ndarray  # (P, L) bits
    total_params: int
    metric: str = ""

    @property
    def average_bits(self) -> np.ndarray:
        return self.weight_bits / self.total_params

    def __len__(self) -> int:
        return len(self.weight_bits)

    def config(self, p: int) -> dict[str, int]:
        return {name: int(b) for name, b in zip(self.layers, self.configs[p])}

    def at(self, avg_bits: float) -> Allocation:
        """The frontier point with the smallest Omega whose size fits `avg_bits` bits per weight."""
        if not is_real(avg_bits) or not math.isfinite(avg_bits):
            raise ValueError(f"avg_bits: expected a finite number of bits per weight, got {avg_bits!r}")
        limit = math.floor(Fraction(avg_bits) * self.total_params)
        fits = np.flatnonzero(self.weight_bits <= limit)
        if len(fits) == 0:
            raise ValueError(f"avg_bits: {avg_bits} is below the smallest configuration "
                             f"({self.average_bits[0]:.4g} bits per weight)")
        p = fits[-1]
        return Allocation(self.config(p), predicted=float(self.omega[p]), weight_bits=int(self.weight_bits[p]),
                          average_bits=float(self.average_bits[p]), method="pareto")

    def plot(self, ax=None, true_values: Any = None, label: str = "Pareto frontier (predicted Ω)",
             true_label: str = "measured at frontier points", **kwargs):
        """Plot predicted Omega against average bits (a staircase: between frontier points the best
        is the previous point). `true_values` (one per frontier point), if given, go on a twin axis."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        x = self.average_bits
        ax.step(x, self.omega, where="post", **{"color": "tab:blue", "lw": 1.5, **kwargs})
        ax.plot(x, self.omega, "o", ms=3, color=kwargs.get("color", "tab:blue"), label=label)
        positive = self.omega[self.omega > 0]
        if len(positive) and positive.max() > 100 * positive.min() and (self.omega > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("average bits per weight")
        ax.set_ylabel(f"predicted Ω ({self.metric or 'cost'})")
        ax.set_title(f"Pareto frontier: {len(self)} of {len(self.choices) ** len(self.layers):,} configurations")
        ax.grid(alpha=0.3)
        if true_values is not None:
            twin = ax.twinx()
            twin.plot(x, np.asarray(true_values), "s", ms=3, color="tab:red", label=true_label)
            twin.set_ylabel(true_label, color="tab:red")
            lines = ax.get_legend_handles_labels()
            more = twin.get_legend_handles_labels()
            ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
            return ax, twin
        ax.legend(fontsize=8)
        return ax


def pareto_frontier(model: nn.Module, sensitivities: Any, choices: Sequence[int] = (2, 3, 4, 8), *,
                    granularity: str | None = None, group_size: int | None = None, symmetric: bool = False,
                    pairs: PairInteractions | None = None) -> ParetoFrontier:
    """HAWQ-V2's Pareto frontier of (model size, Omega), exactly, in one DP pass.

    Multiple-choice knapsack (each layer takes exactly one width): DP_i(s) = min_b DP_{i-1}(s -
    n_i b) + Omega_i(b) at exact integer sizes s (weight bits), keeping only non-dominated sizes,
    so there is no binning error (the ZeroQ/HAWQ authors binned the size). The cost of layer i at
    width b is from `cost_table` (see there for `sensitivities`); `pairs` adds measured adjacent
    interactions (then the DP tracks the last layer's width too). The model is not modified.
    Defaults as `cost_table`'s."""
    table = cost_table(model, sensitivities, choices, granularity=granularity, group_size=group_size,
                       symmetric=symmetric, pairs=pairs)
    return frontier_from_table(table)


def frontier_from_table(table: CostTable, cap: int | None = None) -> ParetoFrontier:
    """The exact Pareto frontier of (size, Omega) of a cost table, in one DP pass: what
    `pareto_frontier` returns for the table `cost_table` builds from a model, here for any table
    (e.g. one restricted to fewer widths). With `cap` (a size in weight bits, as `size_limit`
    gives), states that cannot fit under it are dropped during the DP, as `knapsack` does."""
    size, omega, idx = _pareto_dp(table, cap)
    bits = np.array(table.choices)[idx]
    return ParetoFrontier(list(table.layers), table.choices, size.astype(np.int64), omega, bits,
                          table.total_params, table.metric)


def allocate_bits(model: nn.Module, sensitivities: Any, avg_bits: float, choices: Sequence[int] = (2, 3, 4, 8), *,
                  granularity: str | None = None, group_size: int | None = None, symmetric: bool = False,
                  pairs: PairInteractions | None = None) -> Allocation:
    """HAWQ-V2's allocation: the widths minimising sum_i Omega_i(b_i) subject to
    sum_i n_i b_i <= avg_bits * sum_i n_i, exactly (the knapsack DP of `pareto_frontier`,
    with states that cannot fit pruned).

    `avg_bits` counts weight bits per quantized weight, like `hk.quant.model_size(...).average_bits`
    (scales and zero points are extra). Pass the same `granularity`, `group_size` and `symmetric`
    to `hk.quant.quantize_model` afterwards (the defaults are the same: one asymmetric range per
    output channel). Raises ValueError when `avg_bits` is below the smallest choice (nothing fits).

    Defaults as `cost_table`'s (choices (2, 3, 4, 8)). Measured with them and `sensitivities`'
    defaults (round-to-nearest, test loss): at 2.5 average bits the allocation beat uniform 2-bit
    on all ten models tried (notebook 11's and 14's digits MLPs, a CNN, notebook 12's transformer,
    a GPT-2 character LM, two seeds each) and on the held-out digits MLP; at 3 bits it beat
    uniform 3-bit on 6 of the 10 and matched it on 2 (the additive cost model can misjudge
    several layers at 2 bits at once: notebook 11). With the previous defaults (one symmetric
    range per tensor) the allocation at 2.5 bits left the test loss 0.4-3.7 nats above the float
    model's (now 0.04-0.24), and at 3 bits it lost to uniform 3-bit on 2 of the 10 models and on
    three of three held-out seeds.

    `pairs`: measured interactions of adjacent layers (`hk.quant.pair_interactions`: the DP stays
    exact) or of every pair (`hk.quant.cross_layer_interactions`: the objective is then minimised
    exactly by `allocate_bits_iqp(..., psd=False)`, CLADO's program without its PSD projection)."""
    table = cost_table(model, sensitivities, choices, granularity=granularity, group_size=group_size,
                       symmetric=symmetric, pairs=pairs)
    if table.cross is not None:  # CLADO's terms for every pair: not a chain, the exact IQP instead
        return allocate_bits_iqp(table, avg_bits, psd=False)
    return knapsack(table, avg_bits)


def knapsack(table: CostTable, avg_bits: float) -> Allocation:
    """The exact minimiser of `table`'s Omega under the average-bits budget (see `allocate_bits`)."""
    limit = size_limit(table, avg_bits)
    allocation = frontier_from_table(table, cap=limit).at(avg_bits)
    allocation.method = "knapsack"
    return allocation


# ----------------------------------------------------------------------------- HAWQ-V3's ILP
def _as_table(table: Any, costs: CostTable, name: str) -> np.ndarray:
    if isinstance(table, Mapping):
        try:
            table = [[table[layer][b] for b in costs.choices] for layer in costs.layers]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"resources[{name!r}]: the table lacks an entry {exc}; expected "
                             f"{{layer: {{bits: value}}}} for every layer and width") from None
    array = np.asarray(table, dtype=float)
    if array.shape != costs.omega.shape:
        raise ValueError(f"resources[{name!r}]: expected a table of shape {costs.omega.shape} (layers, choices), "
                         f"got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"resources[{name!r}]: contains nan or inf")
    return array


def interpolated_limit(costs: CostTable, table: Any, r: float, low: int | None = None,
                       high: int | None = None) -> float:
    """HAWQ-V3's limits: cost(all-low) + r (cost(all-high) - cost(all-low)), r in [0, 1]
    (the model zoo's r = 0.25, 0.5, 0.75 are the "low/medium/high" rows; the official ILP notebook:
    "0.25 means 4bit_model_size * 0.75 + 8bit_model_size * 0.25"). low/high default to the
    smallest and largest choice."""
    if not is_real(r) or not 0 <= r <= 1:
        raise ValueError(f"r: expected a number in [0, 1], got {r!r}")
    low = min(costs.choices) if low is None else low
    high = max(costs.choices) if high is None else high
    for label, b in (("low", low), ("high", high)):
        if b not in costs.choices:
            raise ValueError(f"{label}: expected one of the choices {costs.choices}, got {b!r}")
    t = _as_table(table, costs, "table")
    lo, hi = t[:, costs.choices.index(low)].sum(), t[:, costs.choices.index(high)].sum()
    return float(lo + r * (hi - lo))


def layer_macs(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-accumulates of each quantizable layer for ONE sample, counted by forward hooks on
    `example_input` (a batch: a tensor, or a dict passed as `model(**example_input)`): Linear and
    Conv1D in*out per output position, Conv (in/groups) prod(kernel) per output element, Embedding 0
    (a lookup). A tied weight counts every module that uses it (GPT-2's `transformer.wte` the MACs of
    `lm_head`). The model is not modified."""
    layers = quantizable_layers(model)
    counts: dict[str, int] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if is_linear(module):
                counts[name] = counts.get(name, 0) + output.numel() * linear_weight(module).shape[1]
            elif isinstance(module, nn.Embedding):
                counts[name] = counts.get(name, 0)
            else:
                per_out = module.in_channels // module.groups * int(np.prod(module.kernel_size))
                counts[name] = counts.get(name, 0) + output.numel() * per_out
        return record

    try:
        for name in layers:
            for user in weight_users(model, name):
                handles.append(model.get_submodule(user).register_forward_hook(hook(name)))
        with eval_mode(model), torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    batch = max(num_samples(example_input), 1)
    return {name: counts.get(name, 0) // batch for name in layers}


def bops_table(costs: CostTable, macs: Mapping[str, int], act_bits: int = 8) -> np.ndarray:
    """HAWQ-V3's bit operations G_i^b = MACs_i * b * act_bits of each (layer, width)."""
    check_bits(act_bits, symmetric=False, name="act_bits")
    missing = [name for name in costs.layers if name not in macs]
    if missing:
        raise ValueError(f"macs: no count for layers {missing}")
    m = np.array([macs[name] for name in costs.layers], dtype=float)
    return m[:, None] * np.array(costs.choices, dtype=float)[None, :] * act_bits


def allocate_bits_ilp(costs: CostTable, resources: Mapping[str, tuple[Any, float]], *,
                      fixed: Mapping[str, int] | None = None, ties: Sequence[tuple[str, str]] = (),
                      time_limit: float | None = None) -> Allocation:
    """HAWQ-V3's integer linear program (Yao et al., ICML 2021), with `scipy.optimize.milp`:

        minimise   sum_i sum_b Omega_i^b x_i^b           x_i^b in {0, 1}
        s.t.       sum_b x_i^b = 1                        (one width per layer)
                   sum_i sum_b T_i^b x_i^b <= limit_T     for every resource T (size, BOPs, latency)
                   x_a^b = x_c^b for (a, c) in ties       (a residual branch tied to its main path)
                   x_i^{fixed_i} = 1 for fixed layers     (HAWQ-V3 keeps the first/last at 8 bits)

    `costs`: a `CostTable` (pair terms are not linear and are refused). `resources`: {name: (table,
    limit)} with a (layers, choices) table or {layer: {bits: value}}; `costs.size` and
    `size_limit(costs, avg_bits)` give the size constraint, `bops_table` the BOPs,
    `interpolated_limit` HAWQ-V3's limits. Every constraint is checked exactly on the rounded
    solution; an infeasible problem raises ValueError naming the constraint.

    Defaults: no layer `fixed` (HAWQ-V3 keeps the first and last layers at 8 bits: pass
    `fixed={first: 8, last: 8}`), no `ties`, no `time_limit` (HiGHS solves to optimality with a zero
    relative gap, not its default 1e-4, so the result is the exact optimum; measured
    on random tables of 100-300 layers and four widths with one or two constraints: 0.1-1 s)."""
    _check_ilp_inputs(costs, resources)
    L, _ = costs.omega.shape
    tables = _resource_tables(costs, resources)
    allowed = _allowed_widths(costs, fixed)
    tie_rows = _tie_rows(costs, ties)
    _check_reachable(tables, allowed)
    idx, used, status = _solve_ilp(costs, tables, allowed, tie_rows, time_limit, ties, fixed)
    config = {name: costs.choices[j] for name, j in zip(costs.layers, idx)}
    weight_bits = int(costs.size[np.arange(L), idx].sum())
    return Allocation(config, predicted=float(costs.omega[np.arange(L), idx].sum()), weight_bits=weight_bits,
                      average_bits=weight_bits / costs.total_params,
                      resources={name: (used[name], limit) for name, (_, limit) in tables.items()},
                      method="ilp" + ("" if status == 0 else " (time limit)"))


def _check_ilp_inputs(costs: Any, resources: Any) -> None:
    """A CostTable without pair terms, and at least one resource."""
    if not isinstance(costs, CostTable):
        raise TypeError(f"costs: expected a CostTable (hk.quant.cost_table), got {type(costs).__name__}")
    if costs.pairs is not None or costs.cross is not None:
        raise ValueError("costs: pair terms make the objective quadratic; use allocate_bits_iqp (any pairs, "
                         "several constraints) or allocate_bits / pareto_frontier (adjacent pairs: exact DP)")
    if not isinstance(resources, Mapping) or not resources:
        raise ValueError("resources: expected at least one {name: (table, limit)} constraint")


def _resource_tables(costs: CostTable, resources: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, float]]:
    """{name: ((L, B) table T_i^b, limit)} of every resource constraint."""
    tables = {}
    for name, spec in resources.items():
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise ValueError(f"resources[{name!r}]: expected a (table, limit) pair")
        table, limit = spec
        if not is_real(limit) or not math.isfinite(limit):
            raise ValueError(f"resources[{name!r}]: expected a finite limit, got {limit!r}")
        tables[name] = (_as_table(table, costs, name), float(limit))
    return tables


def _allowed_widths(costs: CostTable, fixed: Mapping[str, int] | None) -> np.ndarray:
    """(L, B) booleans: the widths each layer may take (one for a fixed layer), the x_i^b upper bounds."""
    allowed = np.ones(costs.omega.shape, dtype=bool)
    for layer, b in (fixed or {}).items():
        if layer not in costs.layers:
            raise ValueError(f"fixed: unknown layer {layer!r}; layers are {costs.layers}")
        if b not in costs.choices:
            raise ValueError(f"fixed[{layer!r}]: expected one of the choices {costs.choices}, got {b!r}")
        allowed[costs.layers.index(layer)] = np.array(costs.choices) == b
    return allowed


def _tie_rows(costs: CostTable, ties: Sequence[tuple[str, str]]) -> list[np.ndarray]:
    """The rows x_a^b - x_c^b (= 0) of every tied pair (a, c) and width b."""
    L, B = costs.omega.shape
    tie_rows = []
    for pair in ties:
        a, c = pair
        if a not in costs.layers or c not in costs.layers:
            raise ValueError(f"ties: unknown layer in {pair}; layers are {costs.layers}")
        ia, ic = costs.layers.index(a), costs.layers.index(c)
        for j in range(B):
            row = np.zeros(L * B)
            row[ia * B + j], row[ic * B + j] = 1, -1
            tie_rows.append(row)
    return tie_rows


def _check_reachable(tables: Mapping[str, tuple[np.ndarray, float]], allowed: np.ndarray) -> None:
    """A clear message for the obvious infeasibility: a limit below the smallest possible total."""
    for name, (t, limit) in tables.items():
        smallest = np.where(allowed, t, np.inf).min(axis=1).sum()
        if smallest > limit:
            raise ValueError(f"resources[{name!r}]: infeasible: the limit {limit:.6g} is below the smallest "
                             f"possible total {smallest:.6g}")


def _solve_ilp(costs: CostTable, tables: Mapping[str, tuple[np.ndarray, float]], allowed: np.ndarray,
               tie_rows: list[np.ndarray], time_limit: float | None, ties: Any, fixed: Any):
    """Solve HAWQ-V3's program with HiGHS (`_solve_one_hot`). Returns (the chosen width index of
    each layer, {resource: total used}, milp's status)."""
    L, B = costs.omega.shape
    extra = "" if not (ties or fixed) else " and the ties/fixed widths"
    return _solve_one_hot(costs.omega.ravel(), L, B, tables, allowed, list(tie_rows), 0, time_limit,
                          {"mip_rel_gap": 0.0}, extra)


def _solve_one_hot(objective: np.ndarray, L: int, B: int, tables: Mapping[str, tuple[np.ndarray, float]],
                   allowed: np.ndarray, equal_rows: list[np.ndarray], num_extra: int, time_limit: float | None,
                   options: Mapping[str, Any], what: str):
    """min objective @ z over z = (x, extra variables in [0, 1]), x binary and one-hot per layer
    (x[i B + j] = 1: layer i takes width j, only where `allowed`), with `equal_rows` r @ z = 0 and
    every resource sum_i T_i^{b_i} <= limit, by `scipy.optimize.milp` (HiGHS). Every limit is
    checked exactly on the rounded solution; where HiGHS' tolerance let one slip, the limit is
    tightened by the excess and the program solved again (up to 4 times). Returns (the chosen width
    index of each layer, {resource: total used}, milp's status)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    pad = np.zeros(num_extra)
    one_hot = np.hstack([np.kron(np.eye(L), np.ones(B)), np.zeros((L, num_extra))])
    constraints = [LinearConstraint(one_hot, 1, 1)]
    if equal_rows:
        constraints.append(LinearConstraint(np.array(equal_rows), 0, 0))
    integrality = np.concatenate([np.ones(L * B), pad])
    bounds = Bounds(0, np.concatenate([allowed.ravel().astype(float), pad + 1]))
    options = {**options, **({} if time_limit is None else {"time_limit": float(time_limit)})}
    shrink = {name: 0.0 for name in tables}
    for _ in range(4):
        rows = []
        for name, (t, limit) in tables.items():
            scale = max(np.abs(t).max(), abs(limit), 1e-300)  # relative feasibility tolerance
            rows.append(LinearConstraint(np.concatenate([t.ravel(), pad])[None, :] / scale, -np.inf,
                                         (limit - shrink[name]) / scale))
        result = milp(objective, constraints=constraints + rows, integrality=integrality, bounds=bounds,
                      options=options)
        if result.status == 2 or result.x is None:
            raise ValueError(f"resources: infeasible: no configuration satisfies every constraint "
                             f"({', '.join(tables)}){what}")
        if result.status not in (0, 1):
            raise RuntimeError(f"scipy.optimize.milp failed: {result.message}")
        idx = np.round(result.x[:L * B]).reshape(L, B).argmax(axis=1)
        used = {name: float(t[np.arange(L), idx].sum()) for name, (t, _) in tables.items()}
        over = {name: used[name] - limit for name, (_, limit) in tables.items() if used[name] > limit}
        if not over:
            return idx, used, result.status
        for name, excess in over.items():  # HiGHS' tolerance let a constraint slip: tighten and re-solve
            shrink[name] += excess
    raise RuntimeError(f"could not satisfy {sorted(over)} exactly")


# ----------------------------------------------------------------------------- CLADO's IQP
IQP_METHODS = ("milp", "enumerate")


def psd_part(G: np.ndarray) -> np.ndarray:
    """The positive semi-definite part of a symmetric matrix, its negative eigenvalues set to 0:
    the nearest PSD matrix in Frobenius norm. CLADO's official code (`qip_optimizer`,
    `MIQCP_optimize` in JamesTuna/CLADO_MPQ) applies it to its cross-layer matrix before the solve."""
    values, vectors = np.linalg.eigh((G + G.T) / 2)
    P = (vectors * np.clip(values, 0, None)) @ vectors.T
    return (P + P.T) / 2


def _quadratic_values(G: np.ndarray, idx: np.ndarray, B: int) -> np.ndarray:
    """x^T G x of the one-hot vectors of configurations given as width indices (K, L)."""
    flat = idx + B * np.arange(idx.shape[1])[None, :]
    return G[flat[:, :, None], flat[:, None, :]].sum(axis=(1, 2))


def _iqp_milp(G: np.ndarray, L: int, B: int, tables, allowed, time_limit):
    """min x^T G x over one-hot x as a MILP: for every two layers i < l whose block of G is not zero,
    product variables y_ac = x_ia x_lc (continuous in [0, 1]) tied to x by the marginal equations
    sum_c y_ac = x_ia and sum_a y_ac = x_lc, exact for one-hot x: a row a with x_ia = 0 forces its
    y to 0, the one with x_ia = 1 must put y_ac = x_lc. The objective: diag(G) @ x (x^2 = x; two
    widths of one layer never meet) + sum_{i<l} 2 G[(i, a), (l, c)] y_ac. Solved to a zero
    relative optimality gap, the objective scaled to at most 1 in magnitude (HiGHS' absolute gap
    tolerance, 1e-6, is then relative to the largest coefficient)."""
    blocks = G.reshape(L, B, L, B)
    pairs = [(i, l) for i, l in itertools.combinations(range(L), 2) if np.any(blocks[i, :, l, :] != 0)]
    n = L * B + len(pairs) * B * B
    objective = np.concatenate([np.diag(G)] + [2 * blocks[i, :, l, :].ravel() for i, l in pairs])
    rows = []
    for k, (i, l) in enumerate(pairs):
        y = L * B + k * B * B + np.arange(B * B).reshape(B, B)  # y[a, c]: layer i at a, layer l at c
        for a in range(B):
            row = np.zeros(n)
            row[y[a, :]], row[i * B + a] = 1, -1
            rows.append(row)
        for c in range(B):
            row = np.zeros(n)
            row[y[:, c]], row[l * B + c] = 1, -1
            rows.append(row)
    scale = max(np.abs(objective).max(), 1e-300)
    return _solve_one_hot(objective / scale, L, B, tables, allowed, rows, len(pairs) * B * B, time_limit,
                          {"mip_rel_gap": 0.0}, "")


def _iqp_enumeration(G: np.ndarray, L: int, B: int, tables, allowed, max_configs: int):
    """min x^T G x by evaluating every configuration of allowed widths (in chunks): the check."""
    options = [np.flatnonzero(row) for row in allowed]
    count = math.prod(len(o) for o in options)
    if count > max_configs:
        raise ValueError(f"max_configs: {count:,} configurations exceed {max_configs:,}; use method='milp' "
                         "(or raise max_configs)")
    rows = np.arange(L)
    best, best_value = None, math.inf
    configs = itertools.product(*options)
    while chunk := list(itertools.islice(configs, 65536)):
        idx = np.array(chunk, dtype=np.int64).reshape(len(chunk), L)
        ok = np.ones(len(idx), dtype=bool)
        for t, limit in tables.values():
            ok &= t[rows[None, :], idx].sum(axis=1) <= limit
        if not ok.any():
            continue
        values = np.where(ok, _quadratic_values(G, idx, B), np.inf)
        k = int(np.argmin(values))
        if values[k] < best_value:
            best, best_value = idx[k], float(values[k])
    if best is None:
        raise ValueError(f"resources: infeasible: no configuration satisfies every constraint ({', '.join(tables)})")
    return best, {name: float(t[rows, best].sum()) for name, (t, _) in tables.items()}, 0


def allocate_bits_iqp(costs: CostTable, avg_bits: float | None = None, *,
                      resources: Mapping[str, tuple[Any, float]] | None = None, fixed: Mapping[str, int] | None = None,
                      psd: bool = True, method: str = "milp", time_limit: float | None = None,
                      max_configs: int = 1_000_000) -> Allocation:
    """CLADO's integer quadratic program (Deng, Sharify, Wang & Orshansky, arXiv:2307.05657), solved
    exactly:

        minimise   x^T G x                                x_i^b in {0, 1}, one-hot per layer
        s.t.       sum_i n_i b x_i^b <= avg_bits sum_i n_i  (with `avg_bits`; CLADO's size bound)
                   sum_i sum_b T_i^b x_i^b <= limit_T       for every resource T (e.g. BOPs)

    G = `costs.matrix()`: the measured single-layer loss changes on the diagonal and half of the
    cross-layer terms D_il - D_i - D_l of every pair of layers off it (`cost_table(model, measured,
    pairs=cross_layer_interactions(...))`), so that x^T G x = `costs.predict`. Any table works:
    additive (the program is then HAWQ-V3's ILP), adjacent pairs (the DP's chain), all pairs.

    `method="milp"` (default): the quadratic terms linearised with product variables, one per pair
    of widths of two layers (`_iqp_milp`), `scipy.optimize.milp` (HiGHS) with a zero optimality
    gap, every limit checked exactly on the solution. `method="enumerate"`: every configuration
    (at most `max_configs`, default 10^6), the check for small instances. Both return a minimiser
    (ties may differ). `resources` and `fixed` as for `allocate_bits_ilp`; an infeasible budget
    raises ValueError.

    `psd=True` (default, CLADO's official code, `qip_optimizer`/`MIQCP_optimize`): G is replaced by
    its positive semi-definite part (`psd_part`: negative eigenvalues set to 0) before the solve,
    which makes the program convex for the MIQP solver there (Gurobi) and smooths the measured
    terms; the result is then exact for the projected objective, which is what `predicted`
    reports. `psd=False`: the measured model itself. Returns an `Allocation`."""
    if not isinstance(costs, CostTable):
        raise TypeError(f"costs: expected a CostTable (hk.quant.cost_table), got {type(costs).__name__}")
    if method not in IQP_METHODS:
        raise ValueError(f"method: expected one of {IQP_METHODS}, got {method!r}")
    if avg_bits is None and not resources:
        raise ValueError("avg_bits, resources: expected a size budget (avg_bits) and/or resource constraints")
    if resources is not None and not isinstance(resources, Mapping):
        raise ValueError("resources: expected {name: (table, limit)} constraints")
    tables = _resource_tables(costs, resources or {})
    if avg_bits is not None:
        if "size" in tables:
            raise ValueError("resources: 'size' is the avg_bits budget; pass one of them")
        tables = {"size": (costs.size.astype(float), float(size_limit(costs, avg_bits))), **tables}
    allowed = _allowed_widths(costs, fixed)
    _check_reachable(tables, allowed)
    L, B = costs.omega.shape
    G = psd_part(costs.matrix()) if psd else costs.matrix()
    if method == "milp":
        idx, used, status = _iqp_milp(G, L, B, tables, allowed, time_limit)
    else:
        idx, used, status = _iqp_enumeration(G, L, B, tables, allowed, max_configs)
    config = {name: costs.choices[j] for name, j in zip(costs.layers, idx)}
    weight_bits = int(costs.size[np.arange(L), idx].sum())
    label = f"iqp ({'milp' if method == 'milp' else 'enumeration'}{', psd' if psd else ''})"
    return Allocation(config, predicted=float(_quadratic_values(G, np.asarray(idx)[None, :], B)[0]),
                      weight_bits=weight_bits, average_bits=weight_bits / costs.total_params,
                      resources={name: (used[name], limit) for name, (_, limit) in tables.items()},
                      method=label + ("" if status == 0 else " (time limit)"))


# ----------------------------------------------------------------------------- HAWQ v1's order
def fine_tuning_order(model: nn.Module, sensitivities: Any, bits: int | Mapping[str, int], *,
                      granularity: str | None = None, group_size: int | None = None,
                      symmetric: bool = False) -> list[str]:
    """HAWQ (v1)'s block-wise fine-tuning order: descending Omega_i = lambda_i ||Q(W_i) - W_i||^2,
    the layer that the quantization perturbs most in curvature-weighted terms first (it is
    quantized and fine-tuned first, then the next, ...). lambda_i is the `.curvature` of an
    "eigenvalue" `Sensitivities` (the top eigenvalue itself, not divided by n_i); a plain
    {layer: value} mapping is used as it is. `bits`: one width or {layer: width} (HAWQ's chosen
    precisions). The quantizer's defaults are `hk.quant.fake_quantize`'s."""
    layers = list(sensitivities) if isinstance(sensitivities, Mapping) else None
    if not layers:
        raise TypeError(f"sensitivities: expected a Sensitivities or non-empty {{layer: value}}, got {sensitivities!r}")
    modules = check_layers(model, layers)
    if isinstance(bits, Mapping):
        missing = [n for n in modules if n not in bits]
        if missing:
            raise ValueError(f"bits: no width for layers {missing}")
        widths = {n: check_bits(bits[n], symmetric, f"bits[{n!r}]") for n in modules}
    else:
        widths = {n: check_bits(bits, symmetric) for n in modules}
    factor = sensitivities.curvature if isinstance(sensitivities, Sensitivities) and sensitivities.curvature \
        else sensitivities
    omega = {n: float(factor[n]) * quantization_error(layer_weight(modules[n]), widths[n], symmetric, granularity,
                                                      group_size)
             for n in modules}
    return sorted(omega, key=lambda n: -omega[n])


# ----------------------------------------------------------------------------- ground truth
@dataclass
class Enumeration:
    """Every configuration of widths: `configs[k]` (bits per layer, in `layers` order, the last
    layer varying fastest), `values` (what `evaluate` returned: an array, or a dict of arrays
    when it returns a dict), `weight_bits[k]` = sum_i n_i b_i."""

    layers: list[str]
    choices: tuple[int, ...]
    configs: np.ndarray
    values: Any
    weight_bits: np.ndarray
    total_params: int
    baseline: Any = None  # evaluate() on the floating-point model

    @property
    def average_bits(self) -> np.ndarray:
        return self.weight_bits / self.total_params

    def _metric(self, key: str | None) -> np.ndarray:
        if isinstance(self.values, dict):
            if key not in self.values:
                raise ValueError(f"key: expected one of {list(self.values)}, got {key!r}")
            return self.values[key]
        return self.values

    def feasible(self, avg_bits: float, min_fill: float = 0.0, choices: Sequence[int] | None = None) -> np.ndarray:
        """Mask of configurations within `avg_bits` (and using at least `min_fill` of it), with
        every width in `choices` (default: all)."""
        limit = math.floor(Fraction(avg_bits) * self.total_params)
        mask = (self.weight_bits <= limit) & (self.weight_bits >= min_fill * avg_bits * self.total_params)
        if choices is not None:
            mask &= np.isin(self.configs, np.asarray(list(choices))).all(axis=1)
        return mask

    def best(self, avg_bits: float, key: str | None = None, maximize: bool = False,
             choices: Sequence[int] | None = None) -> tuple[dict[str, int], float]:
        """The best feasible configuration and its value (minimum, or maximum with `maximize`)."""
        mask = self.feasible(avg_bits, choices=choices)
        if not mask.any():
            raise ValueError(f"avg_bits: no configuration fits {avg_bits} bits per weight")
        v = np.where(mask, self._metric(key), -np.inf if maximize else np.inf)
        k = int(np.argmax(v) if maximize else np.argmin(v))
        return self.config(k), float(self._metric(key)[k])

    def index(self, config: Mapping[str, int]) -> int:
        """Row of a configuration (the last layer varies fastest)."""
        k = 0
        for name in self.layers:
            k = k * len(self.choices) + self.choices.index(config[name])
        return k

    def value(self, config: Mapping[str, int], key: str | None = None) -> float:
        return float(self._metric(key)[self.index(config)])

    def config(self, k: int) -> dict[str, int]:
        return {name: int(b) for name, b in zip(self.layers, self.configs[k])}


def _check_quantizer_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def exhaustive(model: nn.Module, choices: Sequence[int], evaluate: Callable[[nn.Module], Any], *,
               layers: Sequence[str] | None = None, granularity: str | None = None, group_size: int | None = None,
               symmetric: bool = False, max_configs: int = 10_000, mode: str | None = None) -> Enumeration:
    """Evaluate all |choices|^L configurations: the ground truth that allocators are judged by.

    `evaluate(quantized_model)` returns a number or a dict of numbers (e.g. {"loss": ..., "accuracy":
    ...}). It receives ONE working copy whose weights are swapped in place between calls (fast:
    every Q_b(W_i) is computed once), so it must not keep or modify that model. Raises ValueError
    above `max_configs` configurations (default 10,000, hesskit's cap: each one costs an `evaluate`
    call). The quantizer's defaults are `hk.quant.fake_quantize`'s. The user's model is not modified."""
    _check_quantizer_model(model)
    choices = check_choices(choices, symmetric)
    if not callable(evaluate):
        raise TypeError(f"evaluate: expected a callable evaluate(model), got {type(evaluate).__name__}")
    names = list(check_layers(model, layers))
    count = len(choices) ** len(names)
    if count > max_configs:
        raise ValueError(f"max_configs: {len(choices)}^{len(names)} = {count:,} configurations exceed {max_configs:,}; "
                         "use the allocators (or raise max_configs)")
    swapper = LayerSwapper(model, names, choices, granularity, group_size, symmetric, mode)
    baseline = evaluate(swapper.apply({}))
    configs = np.array(list(itertools.product(choices, repeat=len(names))), dtype=np.int64)
    results = [evaluate(swapper.apply(dict(zip(names, map(int, row))))) for row in configs]
    if isinstance(results[0], Mapping):
        values: Any = {key: np.array([float(r[key]) for r in results]) for key in results[0]}
    else:
        values = np.array([float(r) for r in results])
    modules = quantizable_layers(model)
    n = np.array([modules[name].weight.numel() for name in names], dtype=np.int64)
    return Enumeration(names, choices, configs, values, configs @ n, int(n.sum()), baseline)


def random_configs(costs: CostTable, avg_bits: float, num: int, *, min_fill: float = 0.85, seed: int = 0,
                   max_tries: int = 1_000_000) -> np.ndarray:
    """`num` random configurations (bits, (num, L)) with weight bits in [min_fill * budget, budget]:
    uniform over the configurations that qualify (rejection sampling). min_fill (default 0.85) keeps
    random allocations from winning by being small."""
    limit = size_limit(costs, avg_bits)
    if not is_int(num) or num < 1:
        raise ValueError(f"num: expected a positive integer, got {num!r}")
    if not 0 <= min_fill <= 1:
        raise ValueError(f"min_fill: expected a fraction in [0, 1], got {min_fill!r}")
    rng = np.random.default_rng(seed)
    L, B = costs.omega.shape
    found, tries = [], 0
    while len(found) < num:
        idx = rng.integers(0, B, size=(4096, L))
        size = costs.size[np.arange(L)[None, :], idx].sum(axis=1)
        ok = idx[(size <= limit) & (size >= min_fill * Fraction(avg_bits) * costs.total_params)]
        found.extend(ok[: num - len(found)])
        tries += 4096
        if tries > max_tries and len(found) < num:
            raise ValueError(f"avg_bits, min_fill: fewer than {num} qualifying configurations found in {tries:,} draws")
    return np.array(costs.choices)[np.array(found)]


# ----------------------------------------------------------------------------- Schaefer et al.'s search
@dataclass
class BisectionResult:
    """The cut point `k` (the first k layers of the order at `low_bits`, the rest at `high_bits`),
    its configuration and accuracy drop, and every probe as (k, score, drop)."""

    k: int
    config: dict[str, int]
    score: float
    drop: float
    baseline: float
    probes: list[tuple[int, float, float]] = field(default_factory=list)
    feasible: bool = True

    @property
    def num_evaluations(self) -> int:
        return len(self.probes)


def bisection_search(model: nn.Module, order: Sequence[str], evaluate: Callable[[nn.Module], float],
                     low_bits: int, high_bits: int, max_drop: float, *, min_drop: float | None = None,
                     baseline: float | None = None, granularity: str | None = None, group_size: int | None = None,
                     symmetric: bool = False, mode: str | None = None) -> BisectionResult:
    """Schaefer et al. (2023)'s bisection: with layers sorted from least to most sensitive
    (`order`), put the first k at `low_bits` and the rest at `high_bits`, and binary-search the
    largest k whose drop = baseline - evaluate(quantized) is at most `max_drop`, in O(log L)
    evaluations. With `min_drop`, stop at the first probe whose drop is inside [min_drop,
    max_drop] (the user's accuracy-degradation window). `evaluate` returns a score where higher is
    better (accuracy); `baseline` defaults to evaluate() of the floating-point model. Assumes the
    drop grows with k (true for a good order; otherwise the result is a feasible cut, not the
    largest). If even k = 0 misses the window, returns k = 0 with `feasible=False`.

    Defaults: `min_drop` None (no lower edge: the largest cut within `max_drop`, which is Schaefer
    et al.'s search with the window [0, max_drop]); `baseline` None (the float model's score); the
    quantizer's defaults are `hk.quant.fake_quantize`'s (one asymmetric range per output channel).
    Layers not in `order` stay in floating point; `evaluate` gets one reused working copy."""
    _check_quantizer_model(model)
    order = [order] if isinstance(order, str) else list(order)
    if len(set(order)) != len(order):
        raise ValueError(f"order: a layer is listed twice in {order}")
    names = list(check_layers(model, order))
    low_bits, high_bits = check_bits(low_bits, symmetric, "low_bits"), check_bits(high_bits, symmetric, "high_bits")
    if not low_bits < high_bits:
        raise ValueError(f"low_bits, high_bits: expected low_bits < high_bits, got {low_bits} and {high_bits}")
    if not is_real(max_drop) or not max_drop >= 0:
        raise ValueError(f"max_drop: expected a non-negative accuracy drop, got {max_drop!r}")
    if min_drop is not None and not 0 <= min_drop <= max_drop:
        raise ValueError(f"min_drop: expected 0 <= min_drop <= max_drop = {max_drop}, got {min_drop!r}")
    if not callable(evaluate):
        raise TypeError(f"evaluate: expected a callable evaluate(model) -> score, got {type(evaluate).__name__}")
    swapper = LayerSwapper(model, names, (low_bits, high_bits), granularity, group_size, symmetric, mode)
    base = float(evaluate(swapper.apply({}))) if baseline is None else float(baseline)
    probes: list[tuple[int, float, float]] = []

    def config(k: int) -> dict[str, int]:
        return {name: (low_bits if i < k else high_bits) for i, name in enumerate(order)}

    def probe(k: int) -> float:
        score = float(evaluate(swapper.apply(config(k))))
        probes.append((k, score, base - score))
        return base - score

    def result(k: int, ok: bool = True) -> BisectionResult:
        _, score, drop = next(p for p in reversed(probes) if p[0] == k)
        return BisectionResult(k, config(k), score, drop, base, probes, ok)

    def inside(drop: float) -> bool:
        return min_drop is not None and min_drop <= drop <= max_drop

    if probe(0) > max_drop:
        return result(0, ok=False)
    if inside(probes[-1][2]):
        return result(0)
    lo, hi = 0, len(order) + 1  # drop(lo) <= max_drop; hi: first k known (or assumed) to exceed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        drop = probe(mid)
        if drop <= max_drop:
            lo = mid
            if inside(drop):
                break
        else:
            hi = mid
    return result(lo)
