"""The one pattern every notebook widget follows, and the fast-mode switch the tests set.

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
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable

import torch

__all__ = ["Explorer", "fast_mode", "budget", "claims_mode", "claim", "CLAIMS", "progress", "progress_sink",
           "TrainingRecord", "batch_order", "best_run", "CLOSURES", "make_closure", "run_plan", "loss_and_accuracy"]


def fast_mode() -> bool:
    """True when HESSKIT_FAST is set to a non-empty value other than 0 (the tests set it)."""
    return os.environ.get("HESSKIT_FAST", "") not in ("", "0")


def budget(full: Any, fast: Any) -> Any:
    """`fast` in fast mode (tests), `full` otherwise (results worth reading)."""
    return fast if fast_mode() else full


def claims_mode() -> bool:
    """True when HESSKIT_CLAIMS is set (not 0) and fast mode is off: `make claims` runs the notebooks
    at their full budgets and fails when a claim fails. Fast mode's tiny budgets cannot support the
    conclusions drawn from full runs, so there claims are printed, never enforced."""
    return os.environ.get("HESSKIT_CLAIMS", "") not in ("", "0") and not fast_mode()


CLAIMS: list[tuple[str, bool]] = []  # every claim of this session, in order: (text, held)


def claim(condition: Any, text: str) -> None:
    """Print the verdict on a conclusion the notebook's text draws from a number, and record it
    (in `CLAIMS`, as (text, held)).

    Prints "✓ claim: text" or "✗ claim failed: text" (in fast mode with "(fast mode: not checked)"
    added to a failure). In a claims run (`claims_mode()`) a failed claim raises AssertionError, so
    the notebook run fails; otherwise it only prints. Returns nothing, so a cell that ends with a
    claim shows only the printed verdict."""
    held = bool(condition)
    CLAIMS.append((text, held))
    if held:
        print(f"✓ claim: {text}")
    else:
        note = " (fast mode: not checked)" if fast_mode() else ""
        print(f"✗ claim failed: {text}{note}")
        if claims_mode():
            raise AssertionError(f"claim failed: {text}")


def fit_labels(control: Any) -> None:
    """Let a control's description and button labels take the width their text needs ("max prod…"
    and "Sophia-H (Hutchi…" were cut at ipywidgets' default widths), unless the explorer set one."""
    style = getattr(control, "style", None)
    for key in ("description_width", "button_width"):
        if style is not None and getattr(style, key, None) == "":
            setattr(style, key, "initial" if key == "description_width" else "auto")


BUSY = "<span style='color:#666'>⏳ computing…</span>"

# Where `progress` reports go: the status line of the explorer whose render() is running, else nowhere.
_PROGRESS_SINK: ContextVar[Callable[[int, int, str], None] | None] = ContextVar("hesskit_progress", default=None)


def progress(done: int, total: int, what: str = "") -> None:
    """Report that `done` of `total` units of a long computation (training steps, grid points,
    layers) are finished. Inside an explorer's render() this shows a progress bar with
    "what done/total" in its status line; anywhere else (scripts, tests, a notebook cell that
    calls a computation directly) it does nothing and costs one lookup. Loops call it after
    every unit; the explorer redraws at most 5 times a second."""
    sink = _PROGRESS_SINK.get()
    if sink is not None:
        sink(int(done), int(total), str(what))


@contextmanager
def progress_sink(sink: Callable[[int, int, str], None] | None) -> Iterator[None]:
    """Send every `progress(done, total, what)` report inside the block to `sink` (None: nowhere).
    An explorer's render() installs its status line this way; tests record reports with it."""
    token = _PROGRESS_SINK.set(sink)
    try:
        yield
    finally:
        _PROGRESS_SINK.reset(token)


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
        `progress(...)` (the browser updates while the kernel is busy); an
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
            with progress_sink(show_progress):
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


def batch_order(num_samples: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Each step's batch indices: seeded reshuffles of the training set, epoch after epoch (the
    last incomplete batch of an epoch is dropped), so every optimizer sees the same batches."""
    if batch_size > num_samples:
        raise ValueError(f"batch_size: expected at most {num_samples} (the training set), got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    order = []
    perm, start = torch.randperm(num_samples, generator=gen), 0
    while len(order) < steps:
        if start + batch_size > num_samples:
            perm, start = torch.randperm(num_samples, generator=gen), 0
        order.append(perm[start : start + batch_size])
        start += batch_size
    return order


def best_run(runs):
    """The run with the lowest `final_loss` (inf when it diverged): the one an lr grid picks. Each
    explorer's run type says which loss that is (training or held-out)."""
    return min(runs, key=lambda r: r.final_loss)


CLOSURES = ("backward", "loss", "loss_outputs")


def make_closure(kind: str, opt: Any, compute) -> Any:
    """The closure `opt.step` needs for one minibatch, for any optimizer in the notebooks.

    `compute()` runs the forward pass and returns (loss, outputs). `kind` says what the optimizer
    expects: "backward" (torch.optim: the closure calls loss.backward() and returns the loss),
    "loss" (hesskit's contract: the loss, no backward; the optimizer differentiates it) or
    "loss_outputs" ((loss, outputs), for Sophia-G, Newton-CG with the GGN and K-FAC's mc Fisher)."""
    if kind not in CLOSURES:
        raise ValueError(f"kind: expected one of {CLOSURES}, got {kind!r}")

    def closure():
        opt.zero_grad()
        loss, outputs = compute()
        if kind == "backward":
            loss.backward()
        return (loss, outputs) if kind == "loss_outputs" else loss

    return closure


def run_plan(num_samples: int, steps: int, batch_size: int, eval_every: int, seed: int) -> tuple[list, list[int]]:
    """A training run's budget, checked: each step's batch indices (`batch_order`) and the
    checkpoint steps (0, every `eval_every`, and the last)."""
    if not 1 <= batch_size <= num_samples:
        raise ValueError(f"batch_size: expected 1..{num_samples}, got {batch_size}")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps, eval_every: expected positive integers, got {steps} and {eval_every}")
    return batch_order(num_samples, steps, batch_size, seed), sorted(set(range(0, steps + 1, eval_every)) | {steps})


@torch.no_grad()
def loss_and_accuracy(model, criterion, data, test) -> tuple[float, float]:
    """(mean loss on `data`, nan if not finite; accuracy on `test`) at a checkpoint of a run."""
    loss = criterion(model(data[0]), data[1]).item()
    accuracy = (model(test[0]).argmax(dim=1) == test[1]).double().mean().item()
    return (loss if math.isfinite(loss) else math.nan), accuracy


class TrainingRecord:
    """What the optimizer notebooks read off a training run (a mixin for their `Run` dataclasses).

    The dataclass provides `optimizer`, `lr`, `steps` (checkpoint step numbers, 0 first),
    `train_loss` and `test_accuracy` at the checkpoints, `step_times` (seconds per optimizer
    step) and `diverged`; `labels` maps optimizer keys to display names.
    """

    labels: dict[str, str] = {}

    @property
    def label(self) -> str:
        return f"{self.labels.get(self.optimizer, self.optimizer)} (lr {self.lr:.3g})"

    @property
    def wall(self):
        """Cumulative optimizer seconds at each checkpoint (nan after a divergence)."""
        import numpy as np

        clock = np.concatenate([[0.0], np.cumsum(self.step_times)])
        return np.where(self.steps < len(clock), clock[np.minimum(self.steps, len(clock) - 1)], np.nan)

    @property
    def final_loss(self) -> float:
        """The last full training loss (inf if the run diverged)."""
        value = float(self.train_loss[-1])
        return value if math.isfinite(value) and not self.diverged else math.inf

    @property
    def final_accuracy(self) -> float:
        value = float(self.test_accuracy[-1])
        return value if math.isfinite(value) else math.nan

    @property
    def median_step_time(self) -> float:
        import numpy as np

        return float(np.median(self.step_times)) if len(self.step_times) else math.nan
