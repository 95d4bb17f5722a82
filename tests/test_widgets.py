"""Every notebook widget, driven through its controls' extreme values (an exception inside a
widget's Output would not fail nbmake, so the callbacks are tested here)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402


def test_fast_mode_and_budget(monkeypatch):
    monkeypatch.setenv("HESSKIT_FAST", "1")
    assert hk.widgets.fast_mode() and hk.widgets.budget(100, 3) == 3
    monkeypatch.setenv("HESSKIT_FAST", "0")
    assert not hk.widgets.fast_mode() and hk.widgets.budget(100, 3) == 100


def test_hessian_explorer_over_its_controls():
    explorer = hk.widgets.HessianExplorer(widths=(2, 5), width=3, num_samples=32)
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


def test_mlp_hessian_rejects_bad_width():
    with pytest.raises(ValueError, match="width"):
        hk.widgets.mlp_hessian(0)


def test_render_puts_a_png_into_the_output_widget():
    explorer = hk.widgets.HessianExplorer(widths=(2, 3), width=2, num_samples=16)
    explorer.show()
    (output,) = explorer.output.outputs
    assert output["output_type"] == "display_data" and output["data"]["image/png"].startswith("iVBOR")


def test_make_closure_gives_each_optimizer_kind_its_closure():
    from hesskit.widgets._base import make_closure

    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def compute():
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y), logits

    loss = make_closure("backward", opt, compute)()
    assert model.weight.grad is not None and loss.dim() == 0  # torch.optim: backward inside the closure
    loss = make_closure("loss", opt, compute)()
    assert model.weight.grad is None and loss.requires_grad  # hesskit: zeroed, not differentiated
    loss, logits = make_closure("loss_outputs", opt, compute)()
    assert logits.shape == (5, 2)
    with pytest.raises(ValueError, match="kind"):
        make_closure("grad", opt, compute)
