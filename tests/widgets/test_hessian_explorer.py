import matplotlib; matplotlib.use("Agg")  # noqa: E702,I001  (first: no display needed)

# Notebook 00's explorer driven through its controls, and the progress bar it shows while it renders.
# What it computes: tests/experiments/test_hessian.py.

import numpy as np  # noqa: E402

from hesskit.widgets.hessian import HessianExplorer  # noqa: E402


def test_hessian_explorer_over_its_controls():
    explorer = HessianExplorer(widths=(2, 5), width=3, num_samples=32)
    explorer.show()
    first = explorer.result
    assert first["n"] == 75 * 3 + 10 and first["shown"].shape == (first["n"], first["n"])
    np.testing.assert_allclose(first["shown"], first["shown"].T, atol=1e-12)
    for width in (2, 5):
        explorer.controls["width"].value = width
        assert explorer.result["n"] == 75 * width + 10
        assert 0 < explorer.result["energy_share"] <= 1
    for block in explorer.controls["block"].options:
        explorer.controls["block"].value = block
        size = explorer.result["shown"].shape[0]
        expected = {"all": 75 * 5 + 10, "1.weight": 64 * 5, "1.bias": 5, "3.weight": 50, "3.bias": 10}[block]
        assert size == expected
        assert explorer.figure.axes[0].get_xlabel() == "parameter index"


def test_hessian_explorer_shows_progress_while_it_renders():
    explorer = HessianExplorer(widths=(2, 4), width=2, num_samples=16)
    explorer.show()
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["width"].value = 4  # a new width: a new Hessian, column block by column block
    assert any("dense" in s and "<progress" in s for s in seen)
    assert explorer.status.value == "" and explorer.result["n"] == 75 * 4 + 10
