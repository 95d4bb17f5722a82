"""CLADO (Deng et al., arXiv:2307.05657): the measured cross-layer terms of every pair of layers and
the integer quadratic program over one-hot widths.

Against exact answers: the MILP linearisation against brute-force enumeration of every
configuration on random instances (with and without the PSD projection, extra resources and fixed
widths), and against the exact DP where the objective is additive or a chain; the measured terms
against direct loss evaluations, and, on a loss that is exactly quadratic in the weights, against
d_i^T H_ij d_j from the dense float64 Hessian (`reference.hessian`, autograd only)."""

import itertools

import numpy as np
import pytest
import torch
from reference import gradient, hessian
from torch import nn

from conftest import fit
import hesskit as hk
from hesskit.quant.allocate import (
    CostTable,
    allocate_bits,
    allocate_bits_ilp,
    allocate_bits_iqp,
    cost_table,
    frontier_from_table,
    knapsack,
    pareto_frontier,
    psd_part,
    size_limit,
)
from hesskit.quant.fake import fake_quantize, quantize_model
from hesskit.quant.sensitivity import (
    CrossLayerInteractions,
    PairInteractions,
    cross_layer_interactions,
    pair_interactions,
    sensitivities,
)


# ----------------------------------------------------------------------------- the program
def random_table(seed: int, L: int, B: int, kind: str = "cross", scale: float = 0.5) -> CostTable:
    """Costs falling with the width, random layer sizes and symmetric pair terms of either sign."""
    rng = np.random.default_rng(seed)
    choices = (2, 3, 4, 8)[:B]
    omega = rng.uniform(0.1, 10, (L, 1)) * 4.0 ** -np.arange(B)[None, :] * rng.uniform(0.5, 1.5, (L, B))
    n = rng.integers(1, 60, L)
    if kind == "additive":
        return CostTable.from_arrays(omega, choices, n)
    if kind == "adjacent":
        return CostTable.from_arrays(omega, choices, n, pairs=rng.normal(0, scale, (L - 1, B, B)))
    cross = rng.normal(0, scale, (L, L, B, B))
    cross = cross + cross.transpose(1, 0, 3, 2)
    cross[np.arange(L), np.arange(L)] = 0
    return CostTable.from_arrays(omega, choices, n, cross=cross)


def brute(table: CostTable, G: np.ndarray, feasible) -> float:
    """min x^T G x over every configuration that `feasible(width indices)` accepts, by enumeration."""
    L, B = table.omega.shape
    best = np.inf
    for idx in itertools.product(range(B), repeat=L):
        if feasible(np.array(idx)):
            x = np.zeros(L * B)
            x[np.arange(L) * B + np.array(idx)] = 1
            best = min(best, x @ G @ x)
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("psd", [False, True])
def test_milp_equals_brute_force_enumeration(seed, psd):
    rng = np.random.default_rng(seed)
    L, B = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    table = random_table(seed, L, B)
    G = psd_part(table.matrix()) if psd else table.matrix()
    for avg in [min(table.choices), *rng.uniform(min(table.choices), max(table.choices), 3)]:
        limit = size_limit(table, float(avg))
        expected = brute(table, G, lambda idx: table.size[np.arange(L), idx].sum() <= limit)
        for method in ("milp", "enumerate"):
            a = allocate_bits_iqp(table, float(avg), psd=psd, method=method)
            assert a.weight_bits <= limit and a.weight_bits == table.weight_bits(a)[0]
            assert a.predicted == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert a.resources["size"] == (a.weight_bits, limit)
            if not psd:  # without the projection the program's value is the table's prediction
                assert a.predicted == pytest.approx(table.predict(a)[0], rel=1e-9, abs=1e-12)
        assert a.method == f"iqp (enumeration{', psd' if psd else ''})"


@pytest.mark.parametrize("seed", range(4))
def test_milp_with_resources_and_fixed_widths(seed):
    rng = np.random.default_rng(50 + seed)
    table = random_table(50 + seed, 4, 3, scale=1.0)
    L, B = table.omega.shape
    bops = rng.uniform(0.5, 2.0, (L, 1)) * np.array(table.choices, dtype=float)[None, :]
    limit = float(bops[:, 0].sum() + 0.6 * (bops[:, -1].sum() - bops[:, 0].sum()))
    fixed = {"1": table.choices[-1]}
    size = size_limit(table, 3.0)

    def ok(idx):
        return (table.size[np.arange(L), idx].sum() <= size and bops[np.arange(L), idx].sum() <= limit
                and idx[1] == B - 1)

    expected = brute(table, table.matrix(), ok)
    for method in ("milp", "enumerate"):
        a = allocate_bits_iqp(table, 3.0, resources={"bops": (bops, limit)}, fixed=fixed, psd=False, method=method)
        assert a["1"] == table.choices[-1] and a.resources["bops"][0] <= limit and a.weight_bits <= size
        assert a.predicted == pytest.approx(expected, rel=1e-9)
    only = allocate_bits_iqp(table, resources={"bops": (bops, limit)}, psd=False)  # no size budget at all
    assert only.predicted == pytest.approx(brute(table, table.matrix(),
                                                 lambda idx: bops[np.arange(L), idx].sum() <= limit), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_iqp_equals_the_exact_dp_on_additive_and_chain_tables(seed):
    for kind in ("additive", "adjacent"):
        table = random_table(seed, 5, 4, kind)
        for avg in (2.0, 2.6, 3.3, 5.0):
            dp = knapsack(table, avg)
            iqp = allocate_bits_iqp(table, avg, psd=False)
            assert iqp.predicted == pytest.approx(dp.predicted, rel=1e-9, abs=1e-12)
    additive = random_table(seed, 5, 4, "additive")
    ilp = allocate_bits_ilp(additive, {"size": (additive.size, size_limit(additive, 2.7))})
    assert allocate_bits_iqp(additive, 2.7, psd=False).predicted == pytest.approx(ilp.predicted, rel=1e-9)


def test_matrix_is_the_quadratic_form_of_the_prediction():
    for kind in ("additive", "adjacent", "cross"):
        table = random_table(3, 4, 3, kind)
        G = table.matrix()
        assert np.array_equal(G, G.T)
        configs = np.array(list(itertools.product(table.choices, repeat=4)))
        idx = table.indices(configs)
        X = np.zeros((len(configs), 12))
        X[np.arange(len(configs))[:, None], np.arange(4)[None, :] * 3 + idx] = 1
        np.testing.assert_allclose(np.einsum("ki,ij,kj->k", X, G, X), table.predict(configs), rtol=1e-12, atol=1e-12)
    # a table whose cross terms are only those of adjacent layers predicts what the chain table does
    chain = random_table(4, 4, 3, "adjacent")
    cross = np.zeros((4, 4, 3, 3))
    for i in range(3):
        cross[i, i + 1], cross[i + 1, i] = chain.pairs[i], chain.pairs[i].T
    full = CostTable.from_arrays(chain.omega, chain.choices, chain.num_params, cross=cross)
    configs = np.array(list(itertools.product(chain.choices, repeat=4)))
    np.testing.assert_allclose(full.predict(configs), chain.predict(configs), rtol=1e-12)
    np.testing.assert_allclose(full.matrix(), chain.matrix(), rtol=0, atol=0)


def test_psd_part_is_the_official_codes_projection():
    table = random_table(1, 4, 3, scale=2.0)
    G = table.matrix()
    assert np.linalg.eigvalsh(G).min() < 0  # the measured model need not be convex
    P = psd_part(G)
    assert np.linalg.eigvalsh(P).min() > -1e-10 and np.allclose(P, P.T)
    np.testing.assert_allclose(psd_part(P), P, atol=1e-10)  # a projection
    values, vectors = np.linalg.eig(G)  # CLADO's qip_optimizer: eig, clip, u diag(e) u^T, symmetrise
    values = np.real(values).clip(0)
    vectors = np.real(vectors)
    official = vectors @ np.diag(values) @ vectors.T
    np.testing.assert_allclose(P, (official + official.T) / 2, atol=1e-10)
    # the nearest PSD matrix in Frobenius norm: no random PSD matrix is closer
    rng = np.random.default_rng(0)
    for _ in range(20):
        A = rng.normal(size=G.shape)
        other = P + 0.1 * A @ A.T
        assert np.linalg.norm(G - P) <= np.linalg.norm(G - other) + 1e-12


def test_table_and_program_errors():
    table = random_table(0, 3, 3)
    L, B = 3, 3
    with pytest.raises(ValueError, match="symmetric"):
        CostTable.from_arrays(table.omega, table.choices, table.num_params, cross=np.ones((L, L, B, B)) * np.arange(B))
    bad = table.cross.copy()
    bad[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="zero blocks"):
        CostTable.from_arrays(table.omega, table.choices, table.num_params, cross=bad)
    with pytest.raises(ValueError, match="shape"):
        CostTable.from_arrays(table.omega, table.choices, table.num_params, cross=np.zeros((L, L, B, B + 1)))
    with pytest.raises(ValueError, match="not both"):
        CostTable.from_arrays(table.omega, table.choices, table.num_params, pairs=np.zeros((L - 1, B, B)),
                              cross=np.zeros((L, L, B, B)))
    with pytest.raises(ValueError, match="allocate_bits_iqp"):
        knapsack(table, 3.0)
    with pytest.raises(ValueError, match="allocate_bits_iqp"):
        frontier_from_table(table)
    with pytest.raises(ValueError, match="allocate_bits_iqp"):
        allocate_bits_ilp(table, {"size": (table.size, 1e9)})
    with pytest.raises(TypeError, match="costs"):
        allocate_bits_iqp({"a": 1.0}, 3.0)
    with pytest.raises(ValueError, match="method"):
        allocate_bits_iqp(table, 3.0, method="gurobi")
    with pytest.raises(ValueError, match="avg_bits, resources"):
        allocate_bits_iqp(table)
    with pytest.raises(ValueError, match="avg_bits"):
        allocate_bits_iqp(table, 1.5)
    with pytest.raises(ValueError, match="'size'"):
        allocate_bits_iqp(table, 3.0, resources={"size": (table.size, 1e9)})
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits_iqp(table, resources={"latency": (np.ones((L, B)), 2.0)})
    with pytest.raises(ValueError, match="infeasible"):  # fits each constraint alone, not both
        allocate_bits_iqp(table, 2.0, resources={"latency": (np.array(table.choices)[::-1] * np.ones((L, 1)), 11.0)})
    with pytest.raises(ValueError, match="fixed"):
        allocate_bits_iqp(table, 3.0, fixed={"nope": 2})
    with pytest.raises(ValueError, match="max_configs"):
        allocate_bits_iqp(table, 3.0, method="enumerate", max_configs=10)


# ----------------------------------------------------------------------------- the measurements
def tiny_problem(seed: int = 0, n: int = 24):
    """A 4-5-4-3 tanh MLP in float64, briefly trained (as tests/quant/test_quant_sensitivity.py's)."""
    torch.manual_seed(seed)
    x, y = hk.data.classification(n=n, dim=4, num_classes=3, seed=seed)
    x = x.double()
    model = fit(hk.models.MLP(4, (5, 4), 3, activation="tanh").double(), x, y)
    return model, nn.CrossEntropyLoss(), x, y


LAYERS = ["1", "3", "5"]


def state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()])


def test_cross_layer_terms_are_joint_minus_singles():
    model, criterion, x, y = tiny_problem()
    before = state(model)
    c = cross_layer_interactions(model, criterion, (x, y), (2, 4), granularity="channel", symmetric=True)
    sd, training, flags, grads = before
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()) and model.training == training
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert isinstance(c, CrossLayerInteractions) and c.layers == LAYERS and c.choices == (2, 4)
    assert c.singles.shape == (3, 2) and c.terms.shape == (3, 3, 2, 2)
    assert c.num_evaluations == 1 + 3 * 2 + 3 * 4
    with torch.no_grad():
        base = criterion(model(x), y).item()

        def loss(bits):
            return criterion(quantize_model(model, bits, "channel", symmetric=True)(x), y).item() - base

        assert c.baseline_loss == pytest.approx(base, abs=1e-14)
        for i, j in itertools.permutations(range(3), 2):
            for a, ba in enumerate((2, 4)):
                assert c.singles[i, a] == pytest.approx(loss({LAYERS[i]: ba}), abs=1e-12)
                for d, bd in enumerate((2, 4)):
                    joint = loss({LAYERS[i]: ba, LAYERS[j]: bd})
                    expected = joint - loss({LAYERS[i]: ba}) - loss({LAYERS[j]: bd})
                    assert c.terms[i, j, a, d] == pytest.approx(expected, abs=1e-12)
    assert not c.terms[np.arange(3), np.arange(3)].any()
    # the adjacent subset is exactly what pair_interactions measures
    adjacent = c.adjacent()
    direct = pair_interactions(model, criterion, (x, y), (2, 4), granularity="channel", symmetric=True)
    assert isinstance(adjacent, PairInteractions) and adjacent.num_evaluations == direct.num_evaluations
    np.testing.assert_array_equal(adjacent.terms, direct.terms)
    np.testing.assert_array_equal(adjacent.singles, direct.singles)


class Branches(nn.Module):
    """y = W_1 x_1 + W_2 x_2 + W_3 x_3 over three slices of the input: with the MSE loss, exactly
    quadratic in the three weights together, so CLADO's identity D_ij - D_i - D_j = d_i^T H_ij d_j
    holds without remainder (the branches' inputs are correlated: H_ij != 0)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(3, 2, bias=False) for _ in range(3))

    def forward(self, x):
        return self.a(x[:, :3]) + self.b(x[:, 3:6]) + self.c(x[:, 6:])


def test_cross_terms_are_the_hessian_blocks_on_a_quadratic_loss():
    torch.manual_seed(0)
    z = torch.randn(40, 4, dtype=torch.float64)
    x = torch.cat([z @ torch.randn(4, 3, dtype=torch.float64) for _ in range(3)], dim=1)  # correlated slices
    y = torch.randn(40, 2, dtype=torch.float64)
    model, criterion = Branches().double(), nn.MSELoss()
    choices = (2, 3)
    c = cross_layer_interactions(model, criterion, (x, y), choices)  # hk.quant's default quantizer
    names = ["a.weight", "b.weight", "c.weight"]
    H = hessian(model, names, [(x, y)], criterion)
    theta = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    g = gradient(model, names, theta, [(x, y)], criterion)
    blocks = [slice(0, 6), slice(6, 12), slice(12, 18)]
    weights = [model.a.weight, model.b.weight, model.c.weight]
    d = {(i, b): (fake_quantize(w.detach(), b) - w.detach()).reshape(-1) for i, w in enumerate(weights)
         for b in choices}
    for i, j in itertools.permutations(range(3), 2):
        for a, ba in enumerate(choices):
            di = d[i, ba]
            assert c.singles[i, a] == pytest.approx(float(g[blocks[i]] @ di + 0.5 * di @ H[blocks[i], blocks[i]] @ di),
                                                    rel=1e-9)
            for e, be in enumerate(choices):
                exact = float(di @ H[blocks[i], blocks[j]] @ d[j, be])
                assert abs(exact) > 1e-6  # a real interaction
                assert c.terms[i, j, a, e] == pytest.approx(exact, rel=1e-8)
    # and the all-pairs model predicts every configuration's loss change exactly
    table = cost_table(model, c, choices)
    with torch.no_grad():
        base = criterion(model(x), y).item()
        for bits in itertools.product(choices, repeat=3):
            config = dict(zip(["a", "b", "c"], bits))
            measured = criterion(quantize_model(model, config)(x), y).item() - base
            assert table.predict(config)[0] == pytest.approx(measured, rel=1e-8, abs=1e-12)


def test_cost_table_and_allocation_from_measured_interactions():
    model, criterion, x, y = tiny_problem(1)
    c = cross_layer_interactions(model, criterion, (x, y), (2, 4, 8))
    table = cost_table(model, c, (2, 4, 8))
    assert table.metric == "measured" and table.pairs is None and table.cross is c.terms
    np.testing.assert_array_equal(table.omega, c.singles)
    measured = sensitivities(model, criterion, (x, y), "measured", bits=(2, 4, 8))
    same = cost_table(model, measured, (2, 4, 8), pairs=c)  # the measured table plus the terms: the same costs
    np.testing.assert_array_equal(same.omega, table.omega)
    np.testing.assert_array_equal(same.cross, table.cross)
    chain = cost_table(model, c.adjacent(), (2, 4, 8))
    np.testing.assert_array_equal(chain.pairs, c.adjacent().terms)
    # allocate_bits minimises the all-pairs objective exactly (the IQP without the projection)
    a = allocate_bits(model, measured, 3.0, (2, 4, 8), pairs=c)
    iqp = allocate_bits_iqp(table, 3.0, psd=False, method="enumerate")
    assert a.predicted == pytest.approx(iqp.predicted, abs=1e-12) and a.method.startswith("iqp")
    with pytest.raises(ValueError, match="allocate_bits_iqp"):
        pareto_frontier(model, measured, (2, 4, 8), pairs=c)
    with pytest.raises(ValueError, match="choices"):
        cost_table(model, c, (2, 4))
    with pytest.raises(ValueError, match="pairs"):
        cost_table(model, c, (2, 4, 8), pairs=c.adjacent())
    with pytest.raises(TypeError, match="pairs"):
        cost_table(model, measured, (2, 4, 8), pairs=c.terms)


def test_measurement_errors():
    model, criterion, x, y = tiny_problem()
    with pytest.raises(TypeError, match="model"):
        cross_layer_interactions("model", criterion, (x, y))
    with pytest.raises(TypeError, match="criterion"):
        cross_layer_interactions(model, "ce", (x, y))
    with pytest.raises(ValueError, match="choices"):
        cross_layer_interactions(model, criterion, (x, y), ())
    with pytest.raises(ValueError, match="layers"):
        cross_layer_interactions(model, criterion, (x, y), layers=["0"])
    with pytest.raises(ValueError, match="data"):
        cross_layer_interactions(model, criterion, [])
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double().train()
    with pytest.raises(ValueError, match="mode"):
        cross_layer_interactions(dropout, criterion, (x, y))
    one = cross_layer_interactions(model, criterion, (x, y), (2, 8), layers=["3"])  # one layer: no pairs
    assert one.terms.shape == (1, 1, 2, 2) and not one.terms.any() and one.num_evaluations == 3
