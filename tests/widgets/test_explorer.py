"""The pattern every notebook explorer follows (`hesskit.widgets.explorer.Explorer`): busy and error
states, progress in the status line, labels that fit, the figure in the Output widget (an exception
inside a widget's Output would not fail nbmake, so the callbacks are tested here). Each explorer's
own controls: tests/widgets/test_<topic>_explorer.py."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import hesskit as hk  # noqa: E402


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


def test_render_puts_a_png_into_the_output_widget():
    explorer = hk.widgets.HessianExplorer(widths=(2, 3), width=2, num_samples=16)
    explorer.show()
    (output,) = explorer.output.outputs
    assert output["output_type"] == "display_data" and output["data"]["image/png"].startswith("iVBOR")
