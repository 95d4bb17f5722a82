import matplotlib

matplotlib.use("Agg")

# Notebook 14's GPTQ explorer, driven through every control's extremes. What it computes:
# tests/experiments/test_gptq_experiments.py.

import math  # noqa: E402

import pytest  # noqa: E402

from hesskit.widgets.gptq import GPTQExplorer  # noqa: E402
from fixtures.gptq import LAYERS, task  # noqa: E402,F401 (pytest fixtures)


def test_explorer_over_its_controls(task):
    explorer = GPTQExplorer(task)
    explorer.show()
    r = explorer.result
    assert (r["bits"], r["group_size"], r["damping"], r["act_order"], r["calibration_samples"], r["symmetric"]) == (
        2, None, 0.01, False, 128, False)
    assert r["failure"] is None and set(r["gptq_errors"]) == set(LAYERS)
    assert all(r["gptq_errors"][n] < r["rtn_errors"][n] for n in LAYERS)
    ax_acc, ax_err = explorer.figure.axes
    assert ax_acc.get_ylabel() == "test accuracy (%)" and ax_err.get_yscale() == "log"
    assert ax_err.get_xlabel().startswith("layer") and ax_err.get_ylabel()

    c = explorer.controls
    c["symmetric"].value = True  # the symmetric 2-bit grid: RTN collapses, GPTQ compensates
    assert explorer.result["gptq_loss"] < explorer.result["rtn_loss"]
    c["bits"].value = c["bits"].max
    assert abs(explorer.result["gptq_accuracy"] - explorer.result["float_accuracy"]) < 1.5
    c["bits"].value = c["bits"].min
    assert [g for _, g in c["group_size"].options] == [0, 32, 16, 8]
    for _, g in c["group_size"].options:
        c["group_size"].value = g
        assert explorer.result["group_size"] == (g or None) and explorer.result["failure"] is None
    for value in (c["damping"].min, c["damping"].max):
        c["damping"].value = 10**value
        assert explorer.result["damping"] == pytest.approx(10**value) and explorer.result["failure"] is None
    c["act_order"].value = True
    assert explorer.result["act_order"] is True
    for n in (c["calibration_samples"].options[0], c["calibration_samples"].options[-1]):
        c["calibration_samples"].value = n
        assert explorer.result["calibration_samples"] == n and math.isfinite(explorer.result["gptq_accuracy"])
    assert c["calibration_samples"].options[-1] == 1024

    failed = explorer.compute(2, 0, 0.0, False, 16, False)  # damping 0 and 16 samples for 64 inputs
    assert "raise damping" in failed["failure"] and math.isnan(failed["gptq_accuracy"])
    fig = explorer.draw(failed)
    assert any("GPTQ failed" in t.get_text() for t in fig.axes[1].texts)

    with pytest.raises(ValueError, match="calibration_samples"):
        GPTQExplorer(task, calibration_samples=100)
    with pytest.raises(ValueError, match="group_size"):
        GPTQExplorer(task, group_size=7)
