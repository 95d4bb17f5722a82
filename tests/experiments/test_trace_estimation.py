import matplotlib; matplotlib.use("Agg")  # noqa: E702,I001  (first: no display needed)

# Notebook 01's trace studies: the variance formulas, Hutch++'s tail norm, the repeated hk.trace
# runs and the standard error of their spread, the fewest products each method accepts. The
# explorer: tests/widgets/test_trace_estimation_explorer.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.trace_estimation import (  # noqa: E402
    MIN_PRODUCTS,
    TraceTrials,
    deflated_tail_norm,
    hutchinson_variance,
    too_few_products,
    trace_trials,
)
from fixtures.trace_estimation import spiked_matrix  # noqa: E402


def test_hutchinson_variance_formulas():
    A, lam = spiked_matrix()
    assert hutchinson_variance(A, "gaussian") == pytest.approx(2 * (lam**2).sum().item(), rel=1e-10)
    rad = hutchinson_variance(A, "rademacher")
    assert rad == pytest.approx(2 * ((A**2).sum() - (A.diagonal() ** 2).sum()).item(), rel=1e-12)
    assert 0 < rad < hutchinson_variance(A, "gaussian")
    D = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    assert hutchinson_variance(D, "rademacher") == 0.0
    # Monte Carlo: the sample variance of z^T A z over many Rademacher probes matches the formula
    g = torch.Generator().manual_seed(1)
    Z = torch.randint(0, 2, (A.shape[0], 20_000), generator=g, dtype=torch.float64) * 2 - 1
    samples = (Z * (A @ Z)).sum(dim=0)
    assert samples.mean().item() == pytest.approx(A.trace().item(), abs=4 * math.sqrt(rad / 20_000))
    assert samples.var().item() == pytest.approx(rad, rel=0.08)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_variance(A, "uniform")


def test_deflated_tail_norm():
    A, lam = spiked_matrix()
    assert deflated_tail_norm(lam, 0) == pytest.approx(torch.linalg.norm(A).item(), rel=1e-10)
    assert deflated_tail_norm(lam, 4) == pytest.approx(torch.linalg.norm(lam[4:]).item(), rel=1e-12)
    assert deflated_tail_norm(-lam, 4) == deflated_tail_norm(lam, 4)  # by magnitude
    assert deflated_tail_norm(lam, len(lam)) == 0.0


def test_trace_trials_are_hk_trace_runs():
    A, _ = spiked_matrix()
    trials = trace_trials(A, 12, "hutch++", "gaussian", num_trials=5, seed=3)
    for i in range(5):
        r = hk.trace(A, 12, method="hutch++", distribution="gaussian", seed=3 + i)
        assert trials.estimates[i] == r.value and trials.stderrs[i] == r.stderr
    assert trials.exact == pytest.approx(A.trace().item(), rel=1e-12)


def test_too_few_products():
    assert too_few_products(3, "xtrace", 80).startswith("xtrace needs at least 4 products")
    assert too_few_products(4, "xtrace", 80) is None
    assert too_few_products(3, "xtrace", 3) is None  # m >= n: hk.trace computes the exact trace
    assert hk.trace(torch.eye(3, dtype=torch.float64), 3, method="xtrace").method == "exact"
    assert too_few_products(2, "hutch++", 80).startswith("hutch++ needs at least 3")
    assert too_few_products(3, "hutch++", 80) is None
    assert too_few_products(1, "hutchinson", 80) is None and too_few_products(0, "hutchinson", 80) is not None
    A, _ = spiked_matrix()
    for method, low in MIN_PRODUCTS.items():  # the table agrees with what hk.trace accepts
        hk.trace(A, low, method=method, seed=0)
        with pytest.raises(ValueError, match="num_matvecs"):
            hk.trace(A, low - 1, method=method, seed=0)
    with pytest.raises(ValueError, match="method"):
        too_few_products(10, "exact", 80)


def _trials(values: np.ndarray):
    return TraceTrials(values, np.ones_like(values), 0.0, 1, "hutchinson", "rademacher")


def test_std_stderr_is_the_spread_of_the_std():
    gen = np.random.default_rng(0)
    N = 200
    # normal data: the normal-theory value sigma / sqrt(2 (N - 1)), to within the noise of mu_4
    normal = _trials(gen.normal(0.0, 3.0, N))
    assert normal.std_stderr == pytest.approx(normal.std / math.sqrt(2 * (N - 1)), rel=0.25)
    # skewed data (like z^T A z): the standard error must match the real spread of std over repeats
    repeats = [_trials(gen.chisquare(2, N)) for _ in range(400)]
    spread = np.std([t.std for t in repeats], ddof=1)
    assert np.mean([t.std_stderr for t in repeats]) == pytest.approx(spread, rel=0.15)
    assert np.mean([t.std_stderr for t in repeats]) > 1.3 * np.mean([t.std / math.sqrt(2 * (N - 1)) for t in repeats])
    assert math.isnan(_trials(np.array([1.0, 2.0, 3.0])).std_stderr)
    assert _trials(np.full(10, 2.5)).std_stderr == 0.0
