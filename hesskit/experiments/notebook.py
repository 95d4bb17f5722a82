"""What every notebook uses around its experiments: fast mode (the tests' small budgets) and
`claim`, which prints, and under `make claims` enforces, a conclusion drawn from a number."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["fast_mode", "budget", "claims_mode", "claim", "CLAIMS"]


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
