import matplotlib

matplotlib.use("Agg")

# Notebook 11's HAWQ experiments on a small digits MLP (three layers, 4^3 = 64 configurations): the
# prefix-sharing enumeration against hesskit.quant.allocate.exhaustive (also on the tiny transformer), the proxies
# and their rank correlations, the budget comparison against direct lookups, the cross-layer (CLADO) models against
# the oracle, the seed studies and their progress. The explorer: tests/widgets/test_hawq_explorer.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hesskit.data import digits  # noqa: E402
from hesskit.quant.allocate import exhaustive, knapsack  # noqa: E402
from hesskit.quant.fake import quantize_model  # noqa: E402
from hesskit.quant.sensitivity import cross_layer_interactions, pair_interactions  # noqa: E402
from hesskit.experiments.hawq import (  # noqa: E402
    CROSS_LAYER_MODELS,
    PROXIES,
    all_sensitivities,
    compare_at_budget,
    correlations,
    cross_layer_study,
    cross_layer_tables,
    digits_problem,
    enumerate_configs,
    oracle_comparison,
    restrict,
    seed_study,
    transformer_problem,
)
from hesskit.experiments.tasks import digits_mlp, fit_classifier  # noqa: E402
from fixtures.hawq import SMALL, problem, setup  # noqa: E402,F401 (pytest fixtures)


def test_problem_is_the_shared_digits_trainer(problem):
    (x, y), _ = digits(flatten=True, seed=0)
    direct = fit_classifier(digits_mlp((16, 16), "relu", seed=0), (x, y), 150, 1e-3, batch_size=64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(problem.trained.model.parameters(), direct.parameters()))
    assert not problem.trained.model.training and problem.trained.train_seconds > 0
    assert torch.equal(problem.calibration[0], x[:64]) and len(problem.subsets) == 2


def calibration_loss_and_test_accuracy(problem):
    """The enumeration's readings, written directly: the calibration loss and the test accuracy of a model."""
    x, y = problem.calibration
    xt, yt = problem.trained.test

    def evaluate(m):
        with torch.no_grad():
            accuracy = (m(xt).argmax(1) == yt).double().mean().item()
            return {"loss": problem.criterion(m(x), y).item(), "accuracy": accuracy}

    return evaluate


def test_enumeration_equals_the_generic_exhaustive_search(problem, setup):
    e = setup[3]
    assert e.configs.shape == (64, 3) and e.layers == ["1", "3", "5"]
    evaluate = calibration_loss_and_test_accuracy(problem)
    generic = exhaustive(problem.trained.model, (2, 3, 4, 8), evaluate, granularity="channel", symmetric=True)
    np.testing.assert_array_equal(generic.configs, e.configs)
    np.testing.assert_allclose(e.values["loss"], generic.values["loss"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(e.values["accuracy"], generic.values["accuracy"])
    np.testing.assert_allclose(e.values["delta"], e.values["loss"] - generic.baseline["loss"], atol=1e-6)
    q = quantize_model(problem.trained.model, e.config(17), **problem.quantizer)
    assert e.values["accuracy"][17] == problem.accuracy(q)
    assert e.baseline["accuracy"] == problem.accuracy()


def test_proxies_and_correlations(problem, setup):
    sens, pairs, tables, e = setup
    assert set(tables) == set(PROXIES.values())
    assert set(sens) == {"trace", "eigenvalue", "qbert", "measured"} and pairs.terms.shape == (2, 4, 4)
    rho = correlations(tables, e)
    assert all(-1 <= r <= 1 for r in rho.values())
    assert rho["measured"] > 0.5 and rho["pairs"] > 0.5  # measured losses rank configurations well
    t = restrict(tables["trace"], (2, 8))
    assert t.choices == (2, 8) and t.omega.shape == (3, 2)
    np.testing.assert_array_equal(t.omega[:, 1], tables["trace"].omega[:, 3])
    np.testing.assert_array_equal(restrict(tables["pairs"], (2, 8)).pairs[:, 1, 0], tables["pairs"].pairs[:, 3, 0])


def test_compare_at_budget_against_direct_lookups(setup):
    _, _, tables, e = setup
    c = compare_at_budget(tables, e, 2.5)
    assert c.uniform[0] == 2 and c.uniform[1] == e.value({n: 2 for n in e.layers}, "accuracy")
    mask = (e.weight_bits <= 2.5 * e.total_params) & (e.weight_bits >= 0.85 * 2.5 * e.total_params)
    assert c.num_random == mask.sum() and c.random_median == np.median(e.values["accuracy"][mask])
    assert c.best[1] == e.values["accuracy"][e.weight_bits <= 2.5 * e.total_params].max()
    for name, (config, acc) in c.chosen.items():
        assert acc <= c.best[1] and acc == e.value(config, "accuracy")
        assert sum(config[n] * k for n, k in zip(e.layers, tables[name].num_params)) <= 2.5 * e.total_params
        assert dict(knapsack(tables[name], 2.5)) == config
    narrow = compare_at_budget(tables, e, 5.0, choices=(4, 8))
    assert all(set(cfg.values()) <= {4, 8} for cfg, _ in narrow.chosen.values()) and narrow.uniform[0] == 4
    with pytest.raises(ValueError, match="avg_bits"):
        compare_at_budget(tables, e, 3.0, choices=(4, 8))


def test_seed_study_and_problem():
    r = seed_study([0], avg_bits=(2.5,), proxies=("trace",), **SMALL)
    assert r["trace"].shape == (1, 1) and r["rho_trace"].shape == (1,)
    assert r["best"][0, 0] >= r["trace"][0, 0] and r["best"][0, 0] >= r["uniform"][0, 0]
    assert math.isfinite(r["random"][0, 0])
    with pytest.raises(ValueError, match="calibration"):
        digits_problem(calibration=10_000, steps=1)


def test_sweeps_report_progress(problem, progress_to):
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total, what)))
    all_sensitivities(problem, num_matvecs=4, metrics=("trace", "measured"))
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)] and "pairs" in calls[-1][2]
    calls.clear()
    r = seed_study([0, 1], avg_bits=(2.5,), proxies=("trace",), num_matvecs=4, **SMALL)
    assert [c[:2] for c in calls if c[2] == "seed"] == [(0, 2), (1, 2), (2, 2)]
    assert r["seeds"].tolist() == [0, 1]


TINY_TRANSFORMER = dict(steps=30, calibration=32, num_test=64, num_subsets=2, subset_size=16)


def test_transformer_enumeration_equals_the_generic_exhaustive_search():
    problem = transformer_problem(seed=0, **TINY_TRANSFORMER)
    assert problem.layers == ["embed", "attn.qkv", "attn.out", "mlp.0", "mlp.2", "head"]
    assert len(problem.trained.test[1]) == 64 and len(problem.calibration[1]) == 32 and problem.symmetric
    e = enumerate_configs(problem, (2, 8))  # by stages, 2^6 configurations
    evaluate = calibration_loss_and_test_accuracy(problem)
    generic = exhaustive(problem.trained.model, (2, 8), evaluate, **problem.quantizer)
    np.testing.assert_array_equal(generic.configs, e.configs)
    np.testing.assert_allclose(e.values["loss"], generic.values["loss"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(e.values["accuracy"], generic.values["accuracy"])
    assert e.baseline["accuracy"] == problem.accuracy()
    with pytest.raises(ValueError, match="calibration"):
        transformer_problem(calibration=10_000, steps=1)


def test_cross_layer_models_against_the_oracle(problem, setup):
    e = setup[3]
    cross, tables = cross_layer_tables(problem)
    assert set(tables) == set(CROSS_LAYER_MODELS.values()) and tables["clado_psd"] is tables["clado"]
    assert cross.terms.shape == (3, 3, 4, 4) and cross.num_evaluations == 1 + 3 * 4 + 3 * 16
    assert tables["additive"].pairs is None and tables["additive"].cross is None
    direct = pair_interactions(problem.trained.model, problem.criterion, problem.calibration, **problem.quantizer)
    np.testing.assert_array_equal(tables["adjacent"].pairs, direct.terms)
    np.testing.assert_array_equal(tables["additive"].omega, direct.singles)
    every = cross_layer_interactions(problem.trained.model, problem.criterion, problem.calibration, **problem.quantizer)
    np.testing.assert_array_equal(tables["clado"].cross, every.terms)
    delta, accuracy = e.values["delta"], e.values["accuracy"]
    for budget in (2.5, 3.0):
        c = oracle_comparison(tables, e, budget)
        feasible = np.flatnonzero(e.weight_bits <= budget * e.total_params)
        best = feasible[np.argmin(delta[feasible])]
        assert c.num_feasible == len(feasible) and c.oracle == (e.config(best), delta[best], accuracy[best])
        for key, (config, rank, d, acc) in c.chosen.items():
            k = e.index(config)
            assert k in feasible and (d, acc) == (delta[k], accuracy[k])
            assert rank == 1 + sorted(delta[feasible].tolist()).index(delta[k]) and c.gap(key) == acc - accuracy[best]
        for key in ("additive", "adjacent"):  # the exact DP's optimum
            assert c.predicted[key] == pytest.approx(knapsack(tables[key], budget).predicted, abs=1e-12)
        assert c.predicted["clado"] == pytest.approx(tables["clado"].predict(c.chosen["clado"][0])[0], abs=1e-12)
        assert c.predicted["clado"] == pytest.approx(tables["clado"].predict(e.configs[feasible]).min(), abs=1e-12)
    narrow = restrict(tables["clado"], (2, 8))
    np.testing.assert_array_equal(narrow.cross[0, 2], tables["clado"].cross[0, 2][np.ix_([0, 3], [0, 3])])
    with pytest.raises(ValueError, match="avg_bits"):
        oracle_comparison(tables, e, 1.0)


def test_cross_layer_study_and_the_seed_study_agree(progress_to):
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total, what)))
    r = cross_layer_study("digits", [0, 1], avg_bits=(2.5, 3.0), **SMALL)
    assert [c[:2] for c in calls if c[2] == "seed"] == [(0, 2), (1, 2), (2, 2)]
    for key in CROSS_LAYER_MODELS.values():
        assert r[f"rank_{key}"].shape == (2, 2) and (r[f"rank_{key}"] >= 1).all()
        assert (r[f"rank_{key}"] <= r["num_feasible"]).all() and r[f"gap_{key}"].shape == (2, 2)
    assert "rho_clado_psd" not in r and r["rho_clado"].shape == (2,) and r["avg_bits"].tolist() == [2.5, 3.0]
    assert r["evaluations"].tolist() == [1 + 3 * 4 + 3 * 16] * 2 and r["float_accuracy"].shape == (2,)
    study = seed_study([0, 1], avg_bits=(2.5,), proxies=("trace",), num_matvecs=4, cross_layer_bits=(2.5, 3.0), **SMALL)
    for key, value in r.items():
        np.testing.assert_array_equal(study["cross_layer"][key], value)
    with pytest.raises(ValueError, match="task"):
        cross_layer_study("cifar", [0])
