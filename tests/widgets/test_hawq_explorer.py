import matplotlib

matplotlib.use("Agg")

# Notebook 11's HAWQ explorer driven through every control, on a small digits MLP (three layers,
# 4^3 = 64 configurations). What it computes: tests/experiments/test_hawq.py.

import pytest  # noqa: E402

from hesskit.widgets.hawq import CHOICE_SETS, HAWQExplorer  # noqa: E402
from fixtures.hawq import problem, setup  # noqa: E402,F401 (pytest fixtures)


def test_explorer_over_its_controls(setup):
    _, _, tables, e = setup
    explorer = HAWQExplorer(tables, e, avg_bits=2.5)
    explorer.show()
    r = explorer.result
    assert r["feasible"] and r["average"] <= 2.5 and len(explorer.figure.axes) == 4
    assert explorer.figure.axes[0].get_xlabel() == "average bits per weight"
    slider = explorer.controls["avg_bits"]
    assert (slider.min, slider.max, slider.step) == (2.0, 8.0, 0.25)
    slider.value = slider.max
    r = explorer.result
    assert r["config"] == {n: 8 for n in e.layers}  # everything fits: the smallest Omega is all 8-bit
    assert r["comparison"].uniform[0] == 8
    slider.value = slider.min
    assert set(explorer.result["config"].values()) == {2}  # only all 2-bit fits
    assert explorer.result["gap"] == 0.0
    for proxy in explorer.controls["proxy"].options:  # compute only: drawing each costs time, not coverage
        r = explorer.compute(**{**explorer.values(), "proxy": proxy})
        assert r["proxy"] == proxy and r["average"] <= 2.0
    for name in explorer.controls["choices"].options:
        r = explorer.compute(**{**explorer.values(), "avg_bits": 3.0, "choices": name})
        if min(CHOICE_SETS[name]) > 3.0:
            assert not r["feasible"] and "comparison" not in r
        else:
            assert set(r["config"].values()) <= set(CHOICE_SETS[name]) and r["average"] <= 3.0
            assert r["accuracy"] <= r["comparison"].best[1]
        assert len(r["frontier_accuracy"]) == len(r["frontier"])
    explorer.controls["proxy"].value = "measured + adjacent pairs"
    explorer.controls["choices"].value = "{4, 8} (HAWQ-V3)"  # 2 bits per weight: nothing fits, drawn as such
    assert not explorer.result["feasible"] and explorer.figure is not None
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")
    with pytest.raises(ValueError, match="proxy"):
        HAWQExplorer(tables, e, proxy="nope")
    with pytest.raises(ValueError, match="choices"):
        HAWQExplorer(tables, e, choices="{1, 2}")
