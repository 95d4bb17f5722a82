"""Progress, in one place: `progress_bar` for `progress=True` on the estimators and compression
functions (tqdm.auto: a widget in notebooks, text in a terminal), and `report`/`sink` for the
experiments' loops (training steps, grid points), shown by an explorer while it renders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["progress_bar", "report", "sink", "active"]


class _NoBar:
    """What `progress_bar` returns when progress is off: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ReportBar(_NoBar):
    """What `progress_bar` returns inside a `sink`: each update is a `report` (an explorer's status line)."""

    def __init__(self, total: int | None, desc: str):
        self.total, self.desc, self.done = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.total:
            report(self.done, self.total, self.desc)


def progress_bar(enabled: Any, total: int | None, desc: str, unit: str = "product", group: Any = None) -> Any:
    """A tqdm bar (tqdm.auto: a widget in notebooks, text in a terminal) when `enabled`, else a
    no-op with the same methods. With a process group only process 0 shows it. Inside a `sink`
    (an explorer rendering) an enabled bar goes to the sink as `report`s instead of tqdm."""
    if not isinstance(enabled, bool):
        raise TypeError(f"progress: expected True or False, got {enabled!r}")
    if not enabled:
        return _NoBar()
    if group is not None:
        import torch.distributed as dist

        if dist.get_rank(group) != 0:
            return _NoBar()
    if _PROGRESS_SINK.get() is not None:
        return _ReportBar(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True)


# Where `report` calls go: the status line of the explorer whose render() is running, else nowhere.
_PROGRESS_SINK: ContextVar[Callable[[int, int, str], None] | None] = ContextVar("hesskit_progress", default=None)


def report(done: int, total: int, what: str = "") -> None:
    """Report that `done` of `total` units of a long computation (training steps, grid points,
    layers) are finished. Inside an explorer's render() this shows a progress bar with
    "what done/total" in its status line; anywhere else (scripts, tests, a notebook cell that
    calls a computation directly) it does nothing and costs one lookup. Loops call it after
    every unit; the explorer redraws at most 5 times a second."""
    sink = _PROGRESS_SINK.get()
    if sink is not None:
        sink(int(done), int(total), str(what))


@contextmanager
def sink(sink: Callable[[int, int, str], None] | None) -> Iterator[None]:
    """Send every `report(done, total, what)` report inside the block to `sink` (None: nowhere).
    An explorer's render() installs its status line this way; tests record reports with it."""
    token = _PROGRESS_SINK.set(sink)
    try:
        yield
    finally:
        _PROGRESS_SINK.reset(token)


def active() -> bool:
    """True inside a `sink` (an explorer rendering, a test recording): `progress=active()` shows an
    estimator's products there and no tqdm bar anywhere else."""
    return _PROGRESS_SINK.get() is not None
