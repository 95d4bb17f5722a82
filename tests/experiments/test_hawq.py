import matplotlib

matplotlib.use("Agg")

# Notebook 11's HAWQ experiments on a small digits MLP (three layers, 4^3 = 64 configurations): the
# prefix-sharing enumeration against hesskit.quant.allocate.exhaustive, the proxies and their rank correlations, the
# budget comparison against direct lookups, the seed study and its progress. The explorer:
# tests/widgets/test_hawq_explorer.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hesskit.data import digits  # noqa: E402
from hesskit.quant.allocate import exhaustive, knapsack  # noqa: E402
from hesskit.quant.fake import quantize_model  # noqa: E402
from hesskit.experiments.hawq import (  # noqa: E402
    PROXIES,
    all_sensitivities,
    compare_at_budget,
    correlations,
    digits_problem,
    restrict,
    seed_study,
)
from hesskit.experiments.tasks import digits_mlp, fit_classifier  # noqa: E402
from fixtures.hawq import SMALL, problem, setup  # noqa: E402,F401 (pytest fixtures)


def test_problem_is_the_shared_digits_trainer(problem):
    (x, y), _ = digits(flatten=True, seed=0)
    direct = fit_classifier(digits_mlp((16, 16), "relu", seed=0), (x, y), 150, 1e-3, batch_size=64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(problem.trained.model.parameters(), direct.parameters()))
    assert not problem.trained.model.training and problem.trained.train_seconds > 0
    assert torch.equal(problem.calibration[0], x[:64]) and len(problem.subsets) == 2


def test_enumeration_equals_the_generic_exhaustive_search(problem, setup):
    e = setup[3]
    assert e.configs.shape == (64, 3) and e.layers == ["1", "3", "5"]
    x, y = problem.calibration
    xt, yt = problem.trained.test

    def evaluate(m):
        with torch.no_grad():
            accuracy = (m(xt).argmax(1) == yt).double().mean().item()
            return {"loss": problem.criterion(m(x), y).item(), "accuracy": accuracy}

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
