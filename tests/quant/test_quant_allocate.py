"""Bit allocators against brute force: the knapsack DP (with and without pair terms), the
HAWQ-V3 ILP with several constraints, the exhaustive enumeration, HAWQ v1's order and the
Schaefer-style bisection."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import fit
import hesskit as hk
from hesskit.quant.allocate import (
    CostTable,
    allocate_bits,
    allocate_bits_ilp,
    bisection_search,
    bops_table,
    cost_table,
    exhaustive,
    fine_tuning_order,
    interpolated_limit,
    knapsack,
    layer_macs,
    pareto_frontier,
    random_configs,
    size_limit,
)
from hesskit.quant.fake import model_size, quantization_error, quantize_model
from hesskit.quant.sensitivity import pair_interactions, sensitivities


def random_table(seed: int, L: int = 5, choices=(2, 3, 4, 8), pairs: bool = False) -> CostTable:
    """Costs that fall with the width (as quantization errors do) plus noise, random layer sizes."""
    rng = np.random.default_rng(seed)
    B = len(choices)
    base = rng.uniform(0.1, 10, size=(L, 1)) * 4.0 ** -np.arange(B)[None, :]
    omega = base * rng.uniform(0.5, 1.5, size=(L, B))
    n = rng.integers(1, 60, size=L)
    terms = rng.normal(0, 0.5, size=(L - 1, B, B)) if pairs else None
    return CostTable.from_arrays(omega, choices, n, pairs=terms)


def brute_force(table: CostTable):
    """(weight bits, Omega, bits) of every configuration."""
    configs = np.array(list(itertools.product(table.choices, repeat=len(table.layers))))
    return table.weight_bits(configs), table.predict(configs), configs


def brute_best(table: CostTable, limit: float, extra=()):
    size, omega, configs = brute_force(table)
    ok = size <= limit
    for t, lim in extra:
        idx = table.indices(configs)
        ok &= t[np.arange(len(table.layers))[None, :], idx].sum(axis=1) <= lim + 1e-9
    return omega[ok].min() if ok.any() else None


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pairs", [False, True])
def test_knapsack_dp_is_exact_against_brute_force(seed, pairs):
    table = random_table(seed, pairs=pairs)
    size, omega, configs = brute_force(table)
    N = table.total_params
    rng = np.random.default_rng(100 + seed)
    for avg in [2.0, 8.0, *rng.uniform(2, 8, size=6).round(3)]:
        allocation = knapsack(table, float(avg))
        limit = math.floor(avg * N + 1e-9)
        assert allocation.weight_bits <= limit  # the budget, exactly
        assert allocation.weight_bits == table.weight_bits(allocation)[0]
        assert allocation.predicted == pytest.approx(table.predict(allocation)[0], abs=1e-12)
        assert allocation.predicted == pytest.approx(omega[size <= limit].min(), abs=1e-12)
    # the frontier is the lower envelope of all |B|^L points
    frontier = hk.quant.allocate.frontier_from_table(table)
    assert (np.diff(frontier.weight_bits) > 0).all() and (np.diff(frontier.omega) < 0).all()
    for s, o, bits in zip(frontier.weight_bits, frontier.omega, frontier.configs):
        assert o == pytest.approx(omega[size <= s].min(), abs=1e-12)  # nothing smaller-or-equal is better
        assert o == pytest.approx(table.predict(bits[None])[0], abs=1e-12)
        assert table.weight_bits(bits[None])[0] == s
    for s in np.unique(size):  # and every size's best is on the frontier
        best = omega[size <= s].min()
        assert frontier.omega[frontier.weight_bits <= s].min() == pytest.approx(best, abs=1e-12)


def test_budget_is_exact_on_a_fractional_limit():
    # n = (3, 5): sizes 3 b1 + 5 b2; avg 2.5 allows floor(20) = 20 bits: (2, 2) = 16 fits, (3, 2) = 19 fits,
    # (4, 2) = 22 does not, (2, 3) = 21 does not
    table = CostTable.from_arrays([[9.0, 1.0, 0.5], [1.0, 0.9, 0.8]], (2, 3, 4), [3, 5])
    a = knapsack(table, 2.5)
    assert dict(a) == {"0": 3, "1": 2} and a.weight_bits == 19
    assert size_limit(table, 2.5) == 20 and size_limit(table, 2.0 + 1 / 3) == math.floor(8 * (2 + 1 / 3))
    with pytest.raises(ValueError, match="below the smallest choice"):
        knapsack(table, 1.99)


@pytest.mark.parametrize("seed", range(4))
def test_ilp_equals_the_dp_on_one_constraint_and_brute_force_on_several(seed):
    table = random_table(seed, L=4)
    N = table.total_params
    rng = np.random.default_rng(seed)
    for avg in (2.0, 3.3, 5.0, 8.0):
        limit = size_limit(table, avg)
        ilp = allocate_bits_ilp(table, {"size": (table.size, limit)})
        dp = knapsack(table, avg)
        assert ilp.predicted == pytest.approx(dp.predicted, abs=1e-9)
        assert ilp.weight_bits <= limit and ilp.resources["size"] == (ilp.weight_bits, limit)
    macs = rng.integers(10, 1000, size=4)
    bops = bops_table(table, dict(zip(table.layers, macs)), act_bits=8)
    latency = rng.uniform(0.5, 2.0, size=(4, 1)) * np.array([1.0, 1.1, 1.3, 2.0])[None, :]
    for r in (0.25, 0.5, 0.75):
        resources = {"size": (table.size, interpolated_limit(table, table.size, r)),
                     "bops": (bops, interpolated_limit(table, bops, r, low=3)),
                     "latency": (latency, interpolated_limit(table, latency, 1 - r))}
        ilp = allocate_bits_ilp(table, resources)
        idx = table.indices(ilp)[0]
        for name, (t, limit) in resources.items():
            used = t[np.arange(4), idx].sum()
            assert used <= limit and ilp.resources[name][0] == pytest.approx(used)
        expected = brute_best(table, np.inf, [(t, lim) for t, lim in resources.values()])
        assert ilp.predicted == pytest.approx(expected, abs=1e-9)
    assert ilp.average_bits == ilp.weight_bits / N


def test_ilp_ties_fixed_and_infeasible():
    table = random_table(7, L=4)
    limit = size_limit(table, 5.5)
    ilp = allocate_bits_ilp(table, {"size": (table.size, limit)}, fixed={"0": 8, "3": 8}, ties=[("1", "2")])
    assert ilp["0"] == 8 and ilp["3"] == 8 and ilp["1"] == ilp["2"]
    configs = np.array([c for c in itertools.product(table.choices, repeat=4) if c[0] == 8 and c[3] == 8
                        and c[1] == c[2]])
    ok = table.weight_bits(configs) <= limit
    assert ilp.predicted == pytest.approx(table.predict(configs[ok]).min(), abs=1e-9)
    as_dict = {layer: {b: float(v) for b, v in zip(table.choices, row)} for layer, row in zip(table.layers, table.size)}
    from_dict = allocate_bits_ilp(table, {"size": (as_dict, limit)})
    assert from_dict.predicted == pytest.approx(knapsack(table, 5.5).predicted)
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits_ilp(table, {"size": (table.size, size_limit(table, 2.0) - 1)})
    with pytest.raises(ValueError, match="infeasible"):  # each alone is fine, together they are not
        allocate_bits_ilp(table, {"size": (table.size, limit)}, fixed={"0": 8, "1": 8, "2": 8, "3": 8})
    with pytest.raises(ValueError, match="shape"):
        allocate_bits_ilp(table, {"size": (table.size[:2], limit)})
    with pytest.raises(ValueError, match="resources"):
        allocate_bits_ilp(table, {})
    with pytest.raises(ValueError, match="quadratic"):
        allocate_bits_ilp(random_table(0, pairs=True), {"size": (table.size, limit)})
    with pytest.raises(ValueError, match="r"):
        interpolated_limit(table, table.size, 1.5)


def test_random_configs_fill_the_budget():
    table = random_table(3)
    bits = random_configs(table, 3.0, 50, min_fill=0.85, seed=1)
    size = table.weight_bits(bits)
    assert bits.shape == (50, 5) and (size <= size_limit(table, 3.0)).all()
    assert (size >= 0.85 * 3.0 * table.total_params).all()
    np.testing.assert_array_equal(bits, random_configs(table, 3.0, 50, min_fill=0.85, seed=1))
    assert len({tuple(b) for b in bits}) > 10


# ----------------------------------------------------------------------------- on a model
def deep_mlp(seed: int = 0):
    torch.manual_seed(seed)
    x, y = hk.data.classification(n=64, dim=8, num_classes=4, seed=seed)
    model = fit(hk.models.MLP(8, (8, 8, 8), 4, activation="relu"), x, y, steps=100, lr=0.02)
    return model.eval(), nn.CrossEntropyLoss(), x, y


@pytest.fixture(scope="module")
def mlp():
    return deep_mlp()


def snapshot(model):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return weights, model.training, [p.requires_grad for p in model.parameters()]


def unchanged(model, snap):
    sd, training, flags = snap
    return (model.training == training and [p.requires_grad for p in model.parameters()] == flags
            and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
            and all(p.grad is None for p in model.parameters()))


def test_cost_table_and_allocation_on_a_model(mlp):
    model, criterion, x, y = mlp
    snap = snapshot(model)
    s = sensitivities(model, criterion, (x, y), "trace", num_matvecs=20)
    table = cost_table(model, s, (2, 4, 8), granularity="channel")
    layers = hk.quant.quantizable_layers(model)
    for i, name in enumerate(table.layers):
        for j, b in enumerate((2, 4, 8)):
            expected = s[name] * quantization_error(layers[name].weight, b, granularity="channel")
            assert table.omega[i, j] == pytest.approx(expected, rel=1e-12)
    allocation = allocate_bits(model, s, 3.0, (2, 4, 8), granularity="channel")
    size = model_size(model, dict(allocation), granularity="channel")
    assert size.weight_bits == allocation.weight_bits <= 3.0 * size.quantized_weights
    assert allocation.average_bits == pytest.approx(size.average_bits)
    frontier = pareto_frontier(model, s, (2, 4, 8), granularity="channel")
    assert frontier.at(3.0).predicted == pytest.approx(allocation.predicted)
    assert dict(frontier.at(3.0)) == dict(allocation)
    eigen = sensitivities(model, criterion, (x, y), "eigenvalue")
    e_table = cost_table(model, eigen, (2, 4, 8))
    np.testing.assert_allclose(e_table.omega[:, 0], [eigen.curvature[n] * quantization_error(layers[n].weight, 2)
                                                     for n in e_table.layers])  # HAWQ: lambda * ||dW||^2
    ones = cost_table(model, {n: 1.0 for n in layers}, (2, 4, 8))  # the curvature-free baseline
    np.testing.assert_allclose(ones.omega[:, 1], [quantization_error(layers[n].weight, 4) for n in layers])
    measured = sensitivities(model, criterion, (x, y), "measured", bits=(2, 4, 8))
    m_table = cost_table(model, measured, (2, 4, 8))
    assert m_table.omega[1, 0] == measured.table[m_table.layers[1]][2]
    pairs = pair_interactions(model, criterion, (x, y), (2, 4, 8))
    augmented = allocate_bits(model, measured, 3.0, (2, 4, 8), pairs=pairs)
    p_table = cost_table(model, measured, (2, 4, 8), pairs=pairs)
    size, omega, _ = brute_force(p_table)
    assert augmented.predicted == pytest.approx(omega[size <= 3 * p_table.total_params].min(), abs=1e-12)
    ax = frontier.plot()
    assert ax.get_xlabel() == "average bits per weight"
    assert unchanged(model, snap)
    with pytest.raises(ValueError, match="lacks widths"):
        cost_table(model, sensitivities(model, criterion, (x, y), "measured", bits=2), (2, 4))
    with pytest.raises(ValueError, match="pairs"):
        cost_table(model, measured, (2, 4), pairs=pairs)


def test_allocation_bad_inputs(mlp):
    model, criterion, x, y = mlp
    s = {n: 1.0 for n in hk.quant.quantizable_layers(model)}
    with pytest.raises(ValueError, match="avg_bits"):
        allocate_bits(model, s, 1.5, (2, 4))
    with pytest.raises(ValueError, match="avg_bits"):
        allocate_bits(model, s, 2.9, (3, 4))
    with pytest.raises(ValueError, match="avg_bits"):
        allocate_bits(model, s, float("nan"))
    with pytest.raises(ValueError, match="choices"):
        allocate_bits(model, s, 3.0, ())
    with pytest.raises(ValueError, match="choices"):
        allocate_bits(model, s, 3.0, (2, 2, 4))
    with pytest.raises(ValueError, match="choices"):
        allocate_bits(model, s, 3.0, (1, 4), symmetric=True)  # a symmetric grid needs 2 bits
    with pytest.raises(ValueError, match="choices"):
        allocate_bits(model, s, 3.0, (0, 4))
    with pytest.raises(TypeError, match="choices"):
        allocate_bits(model, s, 3.0, 4)
    with pytest.raises(ValueError, match="layers"):
        allocate_bits(model, {"nope": 1.0}, 3.0)
    with pytest.raises(ValueError, match="nan"):
        allocate_bits(model, {n: math.nan for n in s}, 3.0)
    with pytest.raises(ValueError, match="below the smallest"):
        pareto_frontier(model, s, (2, 4)).at(1.0)


def test_fine_tuning_order_is_hawq_v1s_omega(mlp):
    model, criterion, x, y = mlp
    eigen = sensitivities(model, criterion, (x, y), "eigenvalue")
    layers = hk.quant.quantizable_layers(model)
    order = fine_tuning_order(model, eigen, 2)
    omega = {n: eigen.curvature[n] * quantization_error(layers[n].weight, 2) for n in layers}
    assert order == sorted(omega, key=omega.get, reverse=True)
    mixed = {"1": 8, "3": 2, "5": 4, "7": 2}
    omega = {n: eigen[n] * eigen.num_params[n] * quantization_error(layers[n].weight, mixed[n]) for n in layers}
    assert fine_tuning_order(model, eigen, mixed) == sorted(omega, key=omega.get, reverse=True)
    with pytest.raises(ValueError, match="bits"):
        fine_tuning_order(model, eigen, {"1": 8})


def test_exhaustive_is_the_direct_evaluation(mlp):
    model, criterion, x, y = mlp
    snap = snapshot(model)

    def evaluate(m):
        with torch.no_grad():
            return {"loss": criterion(m(x), y).item(), "acc": (m(x).argmax(1) == y).double().mean().item()}

    e = exhaustive(model, (2, 8), evaluate, granularity="channel")
    assert e.configs.shape == (16, 4)
    assert e.configs[0].tolist() == [2, 2, 2, 2] and e.configs[1].tolist() == [2, 2, 2, 8]  # last layer fastest
    for k in (0, 5, 15):
        q = quantize_model(model, e.config(k), granularity="channel")
        assert e.values["loss"][k] == pytest.approx(evaluate(q)["loss"], abs=1e-12)
        assert e.index(e.config(k)) == k and e.value(e.config(k), "acc") == e.values["acc"][k]
    assert e.baseline["loss"] == pytest.approx(evaluate(model)["loss"], abs=1e-12)
    n = np.array([m.weight.numel() for m in hk.quant.quantizable_layers(model).values()])
    np.testing.assert_array_equal(e.weight_bits, e.configs @ n)
    best, loss = e.best(5.0, key="loss")
    ok = e.weight_bits <= 5.0 * n.sum()
    assert loss == e.values["loss"][ok].min() and sum(n * np.array(list(best.values()))) <= 5.0 * n.sum()
    assert unchanged(model, snap)
    plain = exhaustive(model, [8, 2], lambda m: 1.0, layers=["1", "7"])
    assert plain.values.shape == (4,) and plain.layers == ["1", "7"] and plain.choices == (2, 8)
    with pytest.raises(ValueError, match="max_configs"):
        exhaustive(model, (2, 3, 4, 8), evaluate, max_configs=100)
    with pytest.raises(TypeError, match="evaluate"):
        exhaustive(model, (2, 8), None)


def test_bisection_finds_the_largest_feasible_cut():
    # a monotone toy: 9 layers whose score falls by the weight each loses to 2-bit quantization, so the
    # drop grows with every layer moved to low precision, whatever the order
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(9)])
    snap = snapshot(model)
    names = list(hk.quant.quantizable_layers(model))
    reference = {n: m.weight.detach().clone() for n, m in hk.quant.quantizable_layers(model).items()}

    def score(m):
        layers = hk.quant.quantizable_layers(m)
        return -sum((layers[n].weight - reference[n]).pow(2).sum().item() for n in names)

    order = names[::-1]
    drops = []  # the drop of every cut, by direct evaluation
    for k in range(len(order) + 1):
        q = quantize_model(model, {n: (2 if i < k else 8) for i, n in enumerate(order)})
        drops.append(-score(q))
    assert (np.diff(drops) > 0).all()
    for max_drop in [drops[0] + 1e-12, *(0.5 * (a + b) for a, b in zip(drops[:-1], drops[1:])), drops[-1] + 1]:
        r = bisection_search(model, order, score, 2, 8, max_drop, baseline=0.0)
        expected = max(k for k, d in enumerate(drops) if d <= max_drop)
        assert r.k == expected and r.feasible and r.drop == pytest.approx(drops[expected])
        assert r.config == {n: (2 if i < expected else 8) for i, n in enumerate(order)}
        assert r.num_evaluations <= 1 + math.ceil(math.log2(len(order) + 1))
    infeasible = bisection_search(model, order, score, 2, 8, drops[0] / 2, baseline=0.0)
    assert infeasible.k == 0 and not infeasible.feasible
    window = bisection_search(model, order, score, 2, 8, drops[5], min_drop=drops[2], baseline=0.0)
    assert drops[2] <= window.drop <= drops[5] and window.k in (2, 3, 4, 5)
    default_baseline = bisection_search(model, order, score, 2, 8, drops[3])
    assert default_baseline.baseline == 0.0 and default_baseline.k == 3  # the float model scores 0
    assert unchanged(model, snap)
    with pytest.raises(ValueError, match="low_bits"):
        bisection_search(model, order, score, 8, 4, 1.0)
    with pytest.raises(ValueError, match="max_drop"):
        bisection_search(model, order, score, 2, 8, -1.0)
    with pytest.raises(ValueError, match="order"):
        bisection_search(model, order + order[:1], score, 2, 8, 1.0)
    with pytest.raises(ValueError, match="min_drop"):
        bisection_search(model, order, score, 2, 8, 1.0, min_drop=2.0)


def test_macs_and_bops():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    model.train()
    macs = layer_macs(model, torch.zeros(5, 1, 8, 8))
    assert macs == {"0": 4 * 8 * 8 * 9, "3": 256 * 10}
    assert model.training
    table = CostTable.from_arrays(np.ones((2, 2)), (4, 8), [36, 2560], layers=["0", "3"])
    np.testing.assert_array_equal(bops_table(table, macs, act_bits=4), [[2304 * 16, 2304 * 32], [2560 * 16, 2560 * 32]])
    assert interpolated_limit(table, table.size, 0.25) == pytest.approx(0.75 * 4 * 2596 + 0.25 * 8 * 2596)
    with pytest.raises(ValueError, match="macs"):
        bops_table(table, {"0": 1})
