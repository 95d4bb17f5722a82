import matplotlib

matplotlib.use("Agg")

# Notebook 05's explorer driven through every option of its batch-size slider, on a precomputed
# mini-batch sharpness curve. What it computes: tests/experiments/test_batch_size.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.widgets.batch_size import BatchSizeExplorer  # noqa: E402
from fixtures.batch_size import SIZES, curve, trained  # noqa: E402,F401 (pytest fixtures)


def test_batch_size_explorer_over_its_control(curve):
    explorer = BatchSizeExplorer(curve, batch_size=32)
    explorer.show()
    assert explorer.result["batch_size"] == 32
    slider = explorer.controls["batch_size"]
    values = [value for _, value in slider.options]
    assert values == SIZES and slider.options[-1][0] == "240 (full)"
    seen = {}
    for b in (values[0], values[-1], *values):  # the extremes first, then every option
        slider.value = b
        r = explorer.result
        s = SIZES.index(b)
        assert r["batch_size"] == b and r["index"] == s
        np.testing.assert_allclose(r["values"], curve.values[s])
        assert r["mean"] == pytest.approx(curve.mean[s]) and r["full"] == curve.full
        assert r["max_stable_lr"] == pytest.approx(2 / r["mean"])
        assert 0 <= r["overlap"] <= 1 + 1e-4
        axes = explorer.figure.axes
        assert len(axes) == 3 and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
        seen[b] = r
    full = seen[240]
    assert full["std"] == 0 and full["excess"] == pytest.approx(0, abs=1e-9) and full["overlap"] == pytest.approx(1)
    assert seen[8]["mean"] > seen[240]["mean"] and seen[8]["max_stable_lr"] < seen[240]["max_stable_lr"]
    with pytest.raises(ValueError, match="batch_size"):
        BatchSizeExplorer(curve, batch_size=64)
