"""The closures `opt.step(closure)` takes, for torch.optim's contract and hesskit's."""

from __future__ import annotations

from typing import Any

__all__ = ["CLOSURES", "make_closure"]


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
