"""The copy every compression function returns, so that the user's model is never modified."""

from __future__ import annotations

import copy

from torch import nn


def model_copy(model: nn.Module) -> nn.Module:
    """A deep copy in the same train/eval mode, with the same requires_grad flags and no `.grad`
    (a compressed model carrying the original's stale gradients would mislead)."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    return clone
