import matplotlib; matplotlib.use("Agg")  # noqa: E702,I001  (first: no display needed)

# The trace-estimation explorer of notebook 01, driven through every control's extreme values,
# and the small formulas it rests on.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.widgets.trace_estimation import (  # noqa: E402
    TraceExplorer,
    deflated_tail_norm,
    geometric_counts,
    hutchinson_variance,
    trace_trials,
)


def spiked_matrix(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four large eigenvalues on a small bulk, like the Hessian of a trained classifier."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.cat([torch.tensor([20.0, 12.0, 8.0, 5.0], dtype=torch.float64),
                     0.05 * torch.rand(n - 4, generator=g, dtype=torch.float64)])
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, lam


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


def test_deflated_tail_norm_and_counts():
    A, lam = spiked_matrix()
    assert deflated_tail_norm(lam, 0) == pytest.approx(torch.linalg.norm(A).item(), rel=1e-10)
    assert deflated_tail_norm(lam, 4) == pytest.approx(torch.linalg.norm(lam[4:]).item(), rel=1e-12)
    assert deflated_tail_norm(-lam, 4) == deflated_tail_norm(lam, 4)  # by magnitude
    assert deflated_tail_norm(lam, len(lam)) == 0.0
    counts = geometric_counts(3, 300)
    assert counts[0] == 3 and counts[-1] == 300 and counts == sorted(set(counts))
    with pytest.raises(ValueError, match="low, high"):
        geometric_counts(10, 3)


def test_trace_trials_are_hk_trace_runs():
    A, _ = spiked_matrix()
    trials = trace_trials(A, 12, "hutch++", "gaussian", num_trials=5, seed=3)
    for i in range(5):
        r = hk.trace(A, 12, method="hutch++", distribution="gaussian", seed=3 + i)
        assert trials.estimates[i] == r.value and trials.stderrs[i] == r.stderr
    assert trials.exact == pytest.approx(A.trace().item(), rel=1e-12)


def test_trace_explorer_over_its_controls():
    A, _ = spiked_matrix()
    explorer = TraceExplorer(A, counts=(3, 60), num_matvecs=12, num_trials=30, min_trials=15, max_products=900,
                             name="A")
    explorer.show()
    assert explorer.result["num_matvecs"] == 12 and explorer.result["num_trials"] == 30
    slider = explorer.controls["num_matvecs"]
    low, high = slider.options[0], slider.options[-1]
    assert (low, high) == (3, 60)
    exact = A.trace().item()
    spread = {}
    for method in explorer.controls["method"].options:
        explorer.controls["method"].value = method
        for distribution in explorer.controls["distribution"].options:
            explorer.controls["distribution"].value = distribution
            for m in (low, high):
                slider.value = m
                r = explorer.result
                assert (r["method"], r["distribution"], r["num_matvecs"]) == (method, distribution, m)
                T = explorer.trials_for(m)
                assert r["num_trials"] == T == len(r["estimates"]) and 15 <= T <= 30
                assert r["exact"] == pytest.approx(exact, rel=1e-12)
                # unbiased: the mean of T runs lies within 4 standard errors of the exact trace
                assert abs(r["bias"]) <= 4 * r["std"] / math.sqrt(T) + 1e-9
                if method == "hutchinson":  # the spread matches sqrt(Var / m) (loose: 15-30 skewed runs)
                    assert 0.4 * r["hutchinson_std"] < r["std"] < 2.0 * r["hutchinson_std"]
                if method == "hutch++" and m == 3:  # one remainder sample: no stderr, no interval
                    assert math.isnan(r["mean_stderr"]) and math.isnan(r["coverage"])
                else:
                    assert r["mean_stderr"] > 0 and 0.5 <= r["coverage"] <= 1.0
                ax = explorer.figure.axes[0]
                assert ax.get_xlabel() == "estimate of tr(A)" and ax.get_ylabel() == "number of trials"
                assert method in ax.get_title() and f"m = {m} " in ax.get_title()
                spread[method, distribution, m] = r["std"]
    for method in ("hutchinson", "hutch++"):
        for distribution in ("rademacher", "gaussian"):
            assert spread[method, distribution, high] < spread[method, distribution, low]
    # a sketch of 20 vectors removes the 4 spikes: Hutch++ is far better than Hutchinson at m = 60
    for distribution in ("rademacher", "gaussian"):
        assert spread["hutch++", distribution, high] < 0.1 * spread["hutchinson", distribution, high]
    # results are cached per setting: going back returns the very same runs
    explorer.controls["method"].value = "hutchinson"
    first = explorer.result["estimates"]
    slider.value = low
    slider.value = high
    assert explorer.result["estimates"] is first


def test_rademacher_hutchinson_is_exact_on_a_diagonal_matrix():
    D = torch.diag(torch.linspace(0.5, 3.0, 30, dtype=torch.float64))
    explorer = TraceExplorer(D, counts=(3, 9), num_matvecs=3, num_trials=10, min_trials=10, max_products=100)
    explorer.show()
    np.testing.assert_allclose(explorer.result["estimates"], D.trace().item(), rtol=1e-12)
    assert explorer.result["std"] < 1e-12 and explorer.result["hutchinson_std"] == 0.0
    explorer.controls["distribution"].value = "gaussian"
    assert explorer.result["std"] > 0.1


def test_trace_explorer_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        TraceExplorer(torch.zeros(3, 4))


def _trials(values: np.ndarray):
    from hesskit.widgets.trace_estimation import TraceTrials

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


def test_trials_report_progress_while_an_explorer_renders():
    A, _ = spiked_matrix()
    explorer = TraceExplorer(A, counts=(3, 30), num_matvecs=3, num_trials=12, min_trials=12, max_products=36)
    explorer.show()
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["method"].value = "hutch++"
    assert any("hutch++ runs" in s and "<progress" in s for s in seen)
    assert explorer.status.value == ""
