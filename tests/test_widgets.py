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
    assert hk.experiments.fast_mode() and hk.experiments.budget(100, 3) == 3
    monkeypatch.setenv("HESSKIT_FAST", "0")
    assert not hk.experiments.fast_mode() and hk.experiments.budget(100, 3) == 100


class _Probe(hk.widgets.Explorer):
    """An explorer that records what its controls and status showed while it computed."""

    def __init__(self):
        import ipywidgets as widgets

        self.seen = []
        super().__init__({"x": widgets.IntSlider(value=1, min=0, max=3), "y": widgets.Dropdown(options=["a", "b"],
                                                                                               disabled=True)})

    def compute(self, x, y):
        self.seen.append(([c.disabled for c in self.controls.values()], self.status.value))
        if x == 0:
            raise ValueError("x: expected a positive number, got 0")
        return x

    def draw(self, result):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([0, result])
        plt.close(fig)
        return fig


def test_explorer_shows_it_is_busy_and_shows_errors_in_the_widget():
    explorer = _Probe()
    explorer.show()
    disabled, status = explorer.seen[-1]
    assert disabled == [True, True] and "computing" in status  # while it computed
    assert explorer.status.value == "" and [c.disabled for c in explorer.controls.values()] == [False, True]
    with pytest.raises(ValueError, match="positive"):
        explorer.controls["x"].value = 0
    assert "ValueError" in explorer.status.value and "positive" in explorer.status.value
    assert [c.disabled for c in explorer.controls.values()] == [False, True]  # usable again after the error
    explorer.controls["x"].value = 2
    assert explorer.status.value == "" and explorer.result == 2
    assert explorer.controls["x"].style.description_width == "initial"  # labels are not cut


class _Steps(_Probe):
    """An explorer whose computation reports progress, recording the status line after each unit."""

    def compute(self, x, y):
        for done in range(1, 4):
            hk.progress.report(done, 3, "steps")
            self.seen.append(self.status.value)
        return x


def test_progress_shows_in_the_status_line_only_while_an_explorer_renders():
    hk.progress.report(1, 3, "outside")  # no explorer rendering: nothing to show, no error
    explorer = _Steps()
    explorer.show()
    assert "1/3" in explorer.seen[0] and "<progress" in explorer.seen[0]  # the first report shows at once
    assert "steps 3/3" in explorer.seen[-1]  # the last always shows (redraws are throttled in between)
    assert explorer.status.value == ""  # cleared when done
    hk.progress.report(2, 3, "after")  # the explorer's sink is gone again
    assert explorer.status.value == ""


def test_toggle_button_labels_fit():
    import ipywidgets as widgets

    buttons = widgets.ToggleButtons(options=["Sophia-H (Hutchinson)", "Sophia-G (GNB)"])
    hk.widgets.explorer.fit_labels(buttons)
    assert buttons.style.button_width == "auto" and buttons.style.description_width == "initial"
    fixed = widgets.ToggleButtons(options=["a"], style={"button_width": "90px"})
    hk.widgets.explorer.fit_labels(fixed)
    assert fixed.style.button_width == "90px"  # an explorer's own choice is kept


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
    from hesskit.optim import make_closure

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
