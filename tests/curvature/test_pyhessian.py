"""Cross-check against PyHessian 0.1 on a model where both apply (eval mode, one batch)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import hesskit as hk

pyhessian = pytest.importorskip("pyhessian")


def _problem():
    torch.manual_seed(0)
    (x, y), _ = hk.data.digits(seed=0)
    model = hk.models.MLP(64, (16,), 10).eval()
    return model, nn.CrossEntropyLoss(), (x[:256].reshape(256, -1), y[:256])


def test_top_eigenvalue_and_trace_agree_with_pyhessian():
    model, criterion, data = _problem()
    op = hk.HessianOperator(model, criterion, data)
    exact = torch.linalg.eigvalsh(op.dense().double())
    ours = hk.eigenvalues(op, k=1, tol=1e-6, seed=0).values[0].item()
    torch.manual_seed(0)
    theirs = pyhessian.hessian(copy.deepcopy(model), criterion, data=data, cuda=False)
    top, _ = theirs.eigenvalues(maxIter=200, tol=1e-6)
    assert abs(ours - exact[-1].item()) <= 1e-4 * exact[-1].item()
    assert abs(top[0] - ours) <= 1e-3 * ours
    samples = theirs.trace(maxIter=200, tol=1e-8)  # PyHessian returns the per-probe samples
    mean = sum(samples) / len(samples)
    spread = math.sqrt(sum((s - mean) ** 2 for s in samples) / (len(samples) - 1) / len(samples))
    assert abs(mean - exact.sum().item()) <= 4 * spread


def test_pyhessian_density_crashes_on_current_torch():
    """Documents the README's claim: PyHessian 0.1 calls torch.eig, removed from PyTorch."""
    model, criterion, data = _problem()
    theirs = pyhessian.hessian(copy.deepcopy(model), criterion, data=data, cuda=False)
    with pytest.raises((AttributeError, RuntimeError)):
        theirs.density(iter=5, n_v=1)
