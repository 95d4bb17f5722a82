"""Independent dense references in float64, built from torch.autograd only (never torch.func
transforms, whose second derivatives through layer_norm are wrong in torch 2.13), plus the
finite-difference check that validates them."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call


def params_of(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n] for n in names}


def flat(model: nn.Module, names: list[str]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params_of(model, names).values()])


def unflatten(model: nn.Module, names: list[str], theta: Tensor) -> dict[str, Tensor]:
    shapes = [p.shape for p in params_of(model, names).values()]
    chunks = torch.split(theta, [s.numel() for s in shapes])
    return {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}


def mean_loss(model, names, theta, batches, criterion) -> Tensor:
    """(1/N) sum_b N_b * criterion(model(x_b), y_b) with the selected parameters set to theta."""
    total = sum(len(y) for _, y in batches)
    weights = unflatten(model, names, theta)
    return sum(len(y) / total * criterion(functional_call(model, weights, (x,)), y) for x, y in batches)


def gradient(model, names, theta, batches, criterion) -> Tensor:
    theta = theta.detach().requires_grad_()
    return torch.autograd.grad(mean_loss(model, names, theta, batches, criterion), theta)[0]


def hessian(model, names, batches, criterion) -> Tensor:
    theta = flat(model, names).requires_grad_()
    g = torch.autograd.grad(mean_loss(model, names, theta, batches, criterion), theta, create_graph=True)[0]
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True, allow_unused=True)[0] for i in range(len(g))]
    return torch.stack([r if r is not None else torch.zeros_like(theta) for r in rows]).detach()


def finite_difference_hessian_columns(model, names, batches, criterion, columns, eps=1e-5) -> Tensor:
    """Central differences of the gradient: H e_i ~ (g(theta + eps e_i) - g(theta - eps e_i)) / 2 eps."""
    theta = flat(model, names)
    out = []
    for i in columns:
        e = torch.zeros_like(theta)
        e[i] = eps
        plus = gradient(model, names, theta + e, batches, criterion)
        minus = gradient(model, names, theta - e, batches, criterion)
        out.append((plus - minus) / (2 * eps))
    return torch.stack(out, dim=1)


def jacobian(model, names, x) -> tuple[Tensor, Tensor]:
    """Outputs and their Jacobian (outputs.numel() x n) with respect to the selected parameters."""
    theta = flat(model, names).requires_grad_()
    outputs = functional_call(model, unflatten(model, names, theta), (x,))
    rows = [torch.autograd.grad(o, theta, retain_graph=True, allow_unused=True)[0] for o in outputs.reshape(-1)]
    J = torch.stack([r if r is not None else torch.zeros_like(theta) for r in rows])
    return outputs.detach(), J


def output_hessian(criterion, outputs: Tensor, y: Tensor) -> Tensor:
    f = outputs.reshape(-1).clone().requires_grad_()
    g = torch.autograd.grad(criterion(f.view_as(outputs), y), f, create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g[i], f, retain_graph=True)[0] for i in range(len(f))])


def ggn(model, names, batches, criterion) -> Tensor:
    total = sum(len(y) for _, y in batches)
    G = 0
    for x, y in batches:
        outputs, J = jacobian(model, names, x)
        G = G + len(y) / total * J.T @ output_hessian(criterion, outputs, y) @ J
    return G


def empirical_fisher(model, names, batches, criterion) -> Tensor:
    grads = []
    for x, y in batches:
        for i in range(len(y)):
            grads.append(gradient(model, names, flat(model, names), [(x[i : i + 1], y[i : i + 1])], criterion))
    G = torch.stack(grads)
    return G.T @ G / len(G)


DENSE = {"hessian": hessian, "ggn": ggn, "empirical_fisher": empirical_fisher}
