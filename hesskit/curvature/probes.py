"""What randomized estimators share: counted products (`Counted`), seeds (`make_generator`) and random
probe vectors (`probes`, `DISTRIBUTIONS`). Public, for readers writing their own estimators."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from .._checks import is_int
from ..progress import progress_bar
from .operators import NonFiniteError

__all__ = ["DISTRIBUTIONS", "Counted", "make_generator", "probes"]

DISTRIBUTIONS = ("rademacher", "gaussian")


class Counted:
    """Wraps an operator (a curvature operator or a symmetric torch matrix): counts and times
    products, and with `progress=True` shows them in a progress bar of `total` products, with
    the running estimate the estimator reports through `show(text)`."""

    def __init__(self, op: Any, progress: bool = False, total: int | None = None, desc: str = "products"):
        shape = getattr(op, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != shape[1] or not hasattr(op, "__matmul__"):
            raise TypeError(f"op: expected a square operator with .shape and @ (or a square tensor), got {type(op).__name__}")
        self.op = op
        self.n = int(shape[0])
        self.dtype = getattr(op, "dtype", torch.float64)
        self.device = getattr(op, "device", torch.device("cpu"))
        self.group = getattr(op, "process_group", None)
        self.num_matvecs = 0
        self.matvec_time = 0.0
        self.start = time.perf_counter()
        self.bar = progress_bar(progress, total, desc, group=self.group)

    def show(self, text: str) -> None:
        """The running estimate, next to the progress bar (nothing without one)."""
        self.bar.set_postfix_str(text)

    def __matmul__(self, V: Tensor) -> Tensor:
        t0 = time.perf_counter()
        with torch.no_grad() if isinstance(self.op, Tensor) else nullcontext():
            out = self.op @ V
        self.matvec_time += time.perf_counter() - t0
        k = 1 if V.dim() == 1 else V.shape[1]
        self.num_matvecs += k
        self.bar.update(k)
        if isinstance(self.op, Tensor) and not torch.isfinite(out).all():
            raise NonFiniteError("op: a product came out nan or inf")
        return out.detach()

    def cost(self, seed: int | None) -> dict[str, Any]:
        """What a result records about its products (and the end of the progress bar)."""
        self.bar.close()
        names = getattr(self.op, "param_names", None)
        return dict(
            num_matvecs=self.num_matvecs,
            seed=seed,
            wall_time=time.perf_counter() - self.start,
            matvec_time=self.matvec_time,
            params=None if names is None else tuple(names),
        )


def make_generator(seed: int | None, group: Any = None) -> tuple[int, torch.Generator]:
    """A private CPU generator (the global RNG is untouched); a fresh seed is drawn and reported if
    None. With a process group, a fresh seed is process 0's, so every process draws the same probes."""
    if seed is None:
        from .._distributed import shared_seed

        seed = shared_seed(int.from_bytes(os.urandom(7), "little"), group)
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer or None, got {seed!r}")
    return int(seed), torch.Generator().manual_seed(int(seed))


def probes(n: int, k: int, distribution: str, gen: torch.Generator, like: Counted) -> Tensor:
    """k random probe vectors as the columns of an (n, k) matrix, drawn on CPU then moved."""
    if distribution == "rademacher":
        z = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.float64).mul_(2).sub_(1)
    else:
        z = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)
