"""Linear, logistic and softmax regression: Hessian, GGN and empirical Fisher in closed form.

Parameters are ordered [W (row-major), b], so each sample's Jacobian of the outputs with respect to
the parameters is J_i = [I_C kron x_i^T, I_C] and everything is explicit."""

from __future__ import annotations

import torch
from torch import nn

import hesskit as hk


def _jacobian(x, num_outputs):
    eye = torch.eye(num_outputs, dtype=x.dtype)
    return torch.cat([torch.kron(eye, x[None, :]), eye], dim=1)  # (C, C*d + C)


def _operators(model, criterion, data):
    return [kind(model, criterion, data).dense() for kind in (hk.HessianOperator, hk.GGNOperator, hk.EmpiricalFisherOperator)]


def test_linear_regression_mse():
    x, y = hk.data.regression(n=40, dim=3, seed=0)
    x, y = x.double(), y.double()
    model = nn.Linear(3, 1).double()
    H, G, F = _operators(model, nn.MSELoss(), [(x[:25], y[:25]), (x[25:], y[25:])])
    X = torch.cat([x, torch.ones(40, 1, dtype=x.dtype)], dim=1)
    residual = (model(x) - y).detach()
    assert torch.allclose(H, 2 / 40 * X.T @ X, atol=1e-12)
    assert torch.allclose(G, H, atol=1e-12)  # linear model: GGN = Hessian
    grads = 2 * residual * X
    assert torch.allclose(F, grads.T @ grads / 40, atol=1e-12)


def test_logistic_regression_bce():
    x, labels = hk.data.classification(n=30, dim=2, num_classes=2, seed=1)
    x, y = x.double(), labels.double()[:, None]
    model = nn.Linear(2, 1).double()
    H, G, F = _operators(model, nn.BCEWithLogitsLoss(), (x, y))
    X = torch.cat([x, torch.ones(30, 1, dtype=x.dtype)], dim=1)
    p = torch.sigmoid(model(x)).detach()
    assert torch.allclose(H, (X * p * (1 - p)).T @ X / 30, atol=1e-12)
    assert torch.allclose(G, H, atol=1e-12)
    assert torch.allclose(F, (X * (p - y) ** 2).T @ X / 30, atol=1e-12)


def test_softmax_regression_cross_entropy():
    x, y = hk.data.classification(n=20, dim=3, num_classes=4, seed=2)
    x = x.double()
    model = nn.Linear(3, 4).double()
    H, G, F = _operators(model, nn.CrossEntropyLoss(), (x, y))
    probs = torch.softmax(model(x), dim=1).detach()
    expected_h = 0
    expected_f = 0
    for i in range(20):
        J = _jacobian(x[i], 4)
        p = probs[i]
        expected_h = expected_h + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / 20
        g = J.T @ (p - nn.functional.one_hot(y[i], 4).double())
        expected_f = expected_f + torch.outer(g, g) / 20
    assert torch.allclose(H, expected_h, atol=1e-12)
    assert torch.allclose(G, expected_h, atol=1e-12)
    assert torch.allclose(F, expected_f, atol=1e-12)
    # the top eigenvalue through Lanczos, too
    top = hk.eigenvalues(hk.HessianOperator(model, nn.CrossEntropyLoss(), (x, y)), k=1, tol=1e-10, seed=0)
    assert abs(top.values[0] - torch.linalg.eigvalsh(expected_h)[-1]) < 1e-10
