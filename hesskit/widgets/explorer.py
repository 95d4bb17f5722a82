"""The one pattern every notebook widget follows.

Explicit widgets are wired to one `render()`. `render()` computes and draws first, then puts
the figure into the `Output` widget by setting its `outputs` in one update. It never enters a
`with output:` block: an exception raised there is swallowed by the kernel (nbmake would pass),
and nbclient's routing of captured output can stall a test run until its timeout (nbclient#312).
Figures are object-oriented `matplotlib.figure.Figure`s, so re-rendering never leaks pyplot
figures, and replacing the outputs at once does not flicker. Works with ipywidgets 7.7 and 8.
"""

from __future__ import annotations

import base64
import html
import io
import time
from abc import ABC, abstractmethod
from typing import Any

from ..progress import sink

__all__ = ["Explorer", "fit_labels", "busy_html", "error_html", "figure_output"]


def fit_labels(control: Any) -> None:
    """Let a control's description and button labels take the width their text needs ("max prod…"
    and "Sophia-H (Hutchi…" were cut at ipywidgets' default widths), unless the explorer set one."""
    style = getattr(control, "style", None)
    for key in ("description_width", "button_width"):
        if style is not None and getattr(style, key, None) == "":
            setattr(style, key, "initial" if key == "description_width" else "auto")


BUSY = "<span style='color:#666'>⏳ computing…</span>"

def busy_html(done: int | None = None, total: int | None = None, what: str = "") -> str:
    """The status line while a computation runs: "computing…", with a bar once progress is known."""
    if done is None or not total:
        return BUSY
    label = html.escape(f"{what} {done}/{total}".strip())
    return (f"<span style='color:#666'>⏳ computing… <progress value='{done}' max='{total}' "
            f"style='vertical-align:middle;width:10em'></progress> {label}</span>")


def error_html(exc: BaseException) -> str:
    """A failed computation, as the explorer's status line shows it."""
    return (f"<span style='color:#b00020'>⚠ {html.escape(type(exc).__name__)}: {html.escape(str(exc))}</span>")


def figure_output(figure) -> dict:
    """A figure as a notebook display_data output (PNG), independent of the matplotlib backend."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"output_type": "display_data", "data": {"image/png": png, "text/plain": repr(figure)}, "metadata": {}}


class Explorer(ABC):
    """Base class: subclasses build `self.controls`, then implement `compute` and `draw`.

    `render()` stores what it computed in `self.result` and the figure in `self.figure`, so
    tests can drive every control and assert on the numbers.
    """


    def __init__(self, controls: dict[str, Any]):
        import ipywidgets as widgets

        self.controls = controls
        self.output = widgets.Output()  # sized by its figure: no blank band under a shorter one
        self.status = widgets.HTML(value="")  # "computing…" while busy; a failed computation's error
        self.result: Any = None
        self.figure: Any = None
        for control in controls.values():
            fit_labels(control)
            control.observe(self.render, names="value")
        self.widget = widgets.VBox([widgets.HBox(list(controls.values()), layout={"flex_flow": "row wrap"}),
                                    self.status, self.output])

    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    @abstractmethod
    def compute(self, **values: Any) -> Any:
        """Everything that can fail: runs outside the Output context."""

    @abstractmethod
    def draw(self, result: Any):
        """Build and return a matplotlib Figure from `result` (outside the Output context)."""

    def render(self, change: Any = None) -> None:
        """Compute and draw for the controls' values. While it runs the controls are disabled and
        the status line says "computing…", with a progress bar when the computation reports
        `hesskit.progress.report(...)` (the browser updates while the kernel is busy); an
        exception is shown in the status line, where a student sees it, and raised (a callback's
        exception otherwise reaches only the kernel log)."""
        disabled = {name: getattr(control, "disabled", False) for name, control in self.controls.items()}
        for control in self.controls.values():
            control.disabled = True
        self.status.value = BUSY
        last = [0.0]

        def show_progress(done: int, total: int, what: str) -> None:
            now = time.perf_counter()
            if now - last[0] >= 0.2 or done >= total:
                last[0] = now
                self.status.value = busy_html(done, total, what)

        try:
            with sink(show_progress):
                self.result = self.compute(**self.values())
                self.figure = self.draw(self.result)
        except Exception as exc:
            self.status.value = error_html(exc)
            raise
        finally:
            for name, control in self.controls.items():
                control.disabled = disabled[name]
        self.status.value = ""
        self.output.outputs = (figure_output(self.figure),)

    def show(self):
        """Render once (so the notebook shows results without a click) and return the widget."""
        self.render()
        return self.widget
