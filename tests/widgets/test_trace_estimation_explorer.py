import matplotlib; matplotlib.use("Agg")  # noqa: E702,I001  (first: no display needed)

# The trace-estimation explorer of notebook 01, driven through every control's extreme values, and
# the slider's log-spaced counts. What it computes: tests/experiments/test_trace_estimation.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.widgets.trace_estimation import TraceExplorer, geometric_counts  # noqa: E402
from fixtures.trace_estimation import spiked_matrix  # noqa: E402


def test_geometric_counts():
    counts = geometric_counts(3, 300)
    assert counts[0] == 3 and counts[-1] == 300 and counts == sorted(set(counts))
    with pytest.raises(ValueError, match="low, high"):
        geometric_counts(10, 3)


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
                if method == "xtrace" and m < 4:  # too few products: a message, no runs
                    assert "at least 4 products" in r["message"] and r["num_trials"] == 0
                    continue
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
                assert ("(jackknife)" in ax.get_title()) == (method == "xtrace")
                spread[method, distribution, m] = r["std"]
    assert explorer.controls["method"].options == ("hutchinson", "hutch++", "xtrace")
    for method in ("hutchinson", "hutch++"):
        for distribution in ("rademacher", "gaussian"):
            assert spread[method, distribution, high] < spread[method, distribution, low]
    # a sketch of 20 (Hutch++) or 29 (XTrace) vectors removes the 4 spikes: both are far better than
    # Hutchinson at m = 60
    for distribution in ("rademacher", "gaussian"):
        for method in ("hutch++", "xtrace"):
            assert spread[method, distribution, high] < 0.1 * spread["hutchinson", distribution, high]
    # results are cached per setting: going back returns the very same runs
    explorer.controls["method"].value = "hutchinson"
    first = explorer.result["estimates"]
    slider.value = low
    slider.value = high
    assert explorer.result["estimates"] is first


def test_xtrace_below_four_products_draws_a_message_not_an_error():
    A, _ = spiked_matrix()
    explorer = TraceExplorer(A, counts=(3, 12), num_matvecs=3, num_trials=10, min_trials=10, max_products=200)
    explorer.show()
    explorer.controls["method"].value = "xtrace"  # m = 3: hk.trace would raise
    r = explorer.result
    assert r["message"].startswith("xtrace needs at least 4 products") and r["num_trials"] == 0
    assert explorer.status.value == ""  # rendered, no error in the status line
    ax = explorer.figure.axes[0]
    assert "no estimate of tr(A)" in ax.get_title() and any("at least 4" in t.get_text() for t in ax.texts)
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")
    slider = explorer.controls["num_matvecs"]
    slider.value = next(c for c in slider.options if c >= 4)  # enough products: runs again
    r = explorer.result
    assert "message" not in r and r["num_trials"] == 10 and r["mean_stderr"] > 0
    with pytest.raises(ValueError, match="num_matvecs"):  # what the message spares the student
        hk.trace(A, 3, method="xtrace")


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


def test_trials_report_progress_while_an_explorer_renders():
    A, _ = spiked_matrix()
    explorer = TraceExplorer(A, counts=(3, 30), num_matvecs=3, num_trials=12, min_trials=12, max_products=36)
    explorer.show()
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["method"].value = "hutch++"
    assert any("hutch++ runs" in s and "<progress" in s for s in seen)
    assert explorer.status.value == ""
