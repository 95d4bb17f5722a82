"""`hesskit.optim.make_closure`: the closure each optimizer contract needs."""

from __future__ import annotations

import pytest
import torch

from hesskit.optim import make_closure


def test_make_closure_gives_each_optimizer_kind_its_closure():
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
