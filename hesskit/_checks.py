"""Argument checks shared across hesskit: each raises a clear error naming the argument and what was
expected. One home for them, so every public function words the same mistake the same way."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor


def is_int(value: Any) -> bool:
    """A Python or numpy integer (`np.arange` gives numpy ones), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A Python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_cache_memory(value: Any) -> float | None:
    """None (the default, decided at the first pass), or a budget in bytes >= 0 (inf: no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"cache_memory: expected None (default), a number of bytes >= 0 or float('inf'), got {value!r}")
    return float(value)


def check_damping(value: Any) -> float:
    """The damping of F = damping * I + Fisher: a finite number > 0 (also used by `hk.prune`)."""
    if not is_real(value) or not 0 < value < float("inf"):
        raise ValueError(f"damping: expected a finite number > 0 (so that F = damping * I + Fisher is invertible), "
                         f"got {value!r}")
    return float(value)


def check_graph_params(params: Any) -> list[Tensor]:
    params = [params] if isinstance(params, Tensor) else list(params)
    if not params:
        raise ValueError("params: expected at least one tensor, got none")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}]: expected a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}]: does not require grad")
    return params
