"""hk.optim.NewtonCG and its conjugate_gradient: exact Newton steps on quadratics, the dense damped
GGN step on an MLP, Levenberg-Marquardt damping from hand-computed reduction ratios, Rosenbrock,
errors. The contract every optimizer shares (state_dict, dtypes, the model left alone, param groups,
closure errors) is in test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hesskit as hk
from hesskit.optim.newton_cg import conjugate_gradient


def spd(d: int, cond: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    A = (Q * torch.logspace(0, math.log10(cond), d, dtype=torch.float64)) @ Q.T
    return (A + A.T) / 2, torch.randn(d, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------- the CG solver
def test_cg_solves_spd_system_in_dimension_iterations_and_handles_warm_starts():
    A, b = spd(6, 50.0)
    x_star = torch.linalg.solve(A, b)
    result = conjugate_gradient(lambda v: A @ v, b, tol=0.0, max_iters=6)
    assert result.iterations == 6 and result.products == 6 and not result.negative_curvature
    assert torch.allclose(result.x, x_star, rtol=1e-10)
    assert torch.allclose(result.residual, b - A @ result.x, atol=1e-10)

    exact = conjugate_gradient(lambda v: A @ v, b, x0=x_star, tol=1e-8)
    assert exact.iterations == 0 and exact.products == 1 and exact.converged

    # phi(x0) = 1/2 x0^T A x0 - b^T x0 = 50 b^T x* + 10 b^T x* > 0 = phi(0): the warm start is dropped
    dropped = conjugate_gradient(lambda v: A @ v, b, x0=-10 * x_star, tol=0.0, max_iters=6)
    assert dropped.products == 7 and torch.allclose(dropped.x, result.x, rtol=1e-12)


def test_cg_truncates_at_negative_curvature():
    A = torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64))
    b = torch.tensor([1.0, 0.1], dtype=torch.float64)
    # first direction p0 = b: p0^T A p0 = 3 - 0.01 > 0, so one step x1 = alpha b, alpha = b^T b / b^T A b
    alpha = b.dot(b) / b.dot(A @ b)
    r1 = b - alpha * A @ b
    p1 = r1 + (r1.dot(r1) / b.dot(b)) * b
    assert p1.dot(A @ p1) < 0  # the second direction has negative curvature
    result = conjugate_gradient(lambda v: A @ v, b, tol=0.0, max_iters=10)
    assert result.negative_curvature and result.iterations == 1 and result.products == 2
    assert torch.allclose(result.x, alpha * b)

    # negative curvature on the very first direction, from zero: return b (steepest descent for b = -g)
    first = conjugate_gradient(lambda v: -v, b, tol=0.0, max_iters=10)
    assert first.negative_curvature and first.iterations == 0 and torch.equal(first.x, b)


# --------------------------------------------------------------------- the optimizer on quadratics
def quadratic_closure(opt, A, b, theta, with_outputs=False):
    def closure():
        opt.zero_grad()
        f = theta * 1.0  # outputs f = theta: J = I, so the GGN J^T A J is A
        loss = 0.5 * f @ A @ f - b @ f
        return (loss, f) if with_outputs else loss

    return closure


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_newton_step_on_a_strictly_convex_quadratic_lands_on_the_minimum(curvature):
    A, b = spd(5, 1e3)
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = hk.optim.NewtonCG([theta], lr=1.0, curvature=curvature, damping=0.0, adapt_damping=False,
                            max_cg_iters=5, cg_tol=0.0)
    loss = opt.step(quadratic_closure(opt, A, b, theta, with_outputs=curvature == "ggn"))
    assert loss.item() == 0.0
    assert torch.allclose(theta.detach(), torch.linalg.solve(A, b), rtol=1e-8)
    info = opt.last_step_info
    assert info["cg_iterations"] == 5 and info["num_products"] == 5 and math.isnan(info["rho"])
    assert torch.equal(theta.grad, -b)  # the step's gradient at theta = 0 is left in .grad


def test_converges_on_an_ill_conditioned_quadratic():
    """cond(A) = 1e4. With the defaults CG stops at relative residual 1e-5, so each step leaves an
    error of about cond * 1e-5 of the last: a few steps reach 1e-8. Truncated at 3 CG iterations every
    step still decreases the error in the A-norm (CG minimises it over its Krylov space), only slowly.
    On a quadratic a warm start 0.95 d_prev is worse than zero (the residual of the previous CG is
    orthogonal to d_prev, so phi(0.95 d_prev) = 0.45 d_prev^T A d_prev > 0) and is dropped."""
    A, b = spd(20, 1e4, seed=1)
    x_star = torch.linalg.solve(A, b)
    theta = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    opt = hk.optim.NewtonCG([theta], curvature="hessian", damping=1e-4)
    closure = quadratic_closure(opt, A, b, theta)
    for _ in range(4):
        opt.step(closure)
    assert ((theta.detach() - x_star).norm() / x_star.norm()).item() < 1e-8

    def a_norm(e):
        return (e @ A @ e).sqrt().item()

    theta = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    opt = hk.optim.NewtonCG([theta], curvature="hessian", damping=1e-4, max_cg_iters=3)
    closure = quadratic_closure(opt, A, b, theta)
    errors = [a_norm(x_star)]
    for _ in range(20):
        opt.step(closure)
        errors.append(a_norm(theta.detach() - x_star))
        assert opt.last_step_info["cg_iterations"] == 3
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))


def test_levenberg_marquardt_on_a_quadratic_model_that_is_exact():
    """On a quadratic the undamped model is the loss, so rho = 1 for any step: damping * 2/3."""
    A, b = spd(4, 10.0)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = hk.optim.NewtonCG([theta], lr=0.5, curvature="hessian", damping=3.0)
    opt.step(quadratic_closure(opt, A, b, theta))
    assert opt.last_step_info["rho"] == pytest.approx(1.0, rel=1e-10)
    assert opt.damping == pytest.approx(2.0) and opt.last_step_info["damping"] == 3.0
    assert opt.last_step_info["num_products"] == opt.last_step_info["cg_iterations"] + 1  # + C p for rho


def test_levenberg_marquardt_raises_damping_when_the_model_overshoots():
    """f(x) = sqrt(1 + x^2) at x = 2: g = x/sqrt(1+x^2), H = (1+x^2)^(-3/2); the damped Newton step
    d = -g/(H + lambda) jumps far past the minimum, the loss rises, rho < 0, damping * 3/2, and the
    step is undone."""
    x0, lam = 2.0, 0.01
    g, H = x0 / math.sqrt(1 + x0**2), (1 + x0**2) ** -1.5
    d = -g / (H + lam)
    predicted = g * d + 0.5 * H * d**2
    actual = math.sqrt(1 + (x0 + d) ** 2) - math.sqrt(1 + x0**2)
    x = torch.tensor([x0], dtype=torch.float64, requires_grad=True)
    opt = hk.optim.NewtonCG([x], curvature="hessian", damping=lam)

    def closure():
        opt.zero_grad()
        return torch.sqrt(1 + x[0] ** 2)

    opt.step(closure)
    assert x.item() == x0 and opt.last_step_info["rejected"]
    assert opt.last_step_info["rho"] == pytest.approx(actual / predicted, rel=1e-10)
    assert actual / predicted < 0 and opt.damping == pytest.approx(1.5 * lam)
    assert x.grad.item() == pytest.approx(g)  # the second closure call did not wipe the step's gradient


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_rosenbrock_with_the_hessian(dtype, tol):
    x = torch.tensor([-1.2, 1.0], dtype=dtype, requires_grad=True)
    opt = hk.optim.NewtonCG([x], curvature="hessian", damping=1.0)

    def closure():
        opt.zero_grad()
        return rosenbrock(x)

    for _ in range(40):
        opt.step(closure)
    assert x.dtype == dtype
    assert (x.detach().double() - 1).abs().max() < tol


# --------------------------------------------------------------------- the GGN on an MLP
def mlp_problem(dtype=torch.float64):
    torch.manual_seed(0)
    x, y = hk.data.classification(n=16, dim=4, num_classes=3, seed=1)
    model = hk.models.MLP(4, (5,), 3, activation="tanh").to(dtype)
    return model, nn.CrossEntropyLoss(), x.to(dtype), y


def test_ggn_step_on_an_mlp_matches_the_dense_damped_ggn_solve():
    model, criterion, x, y = mlp_problem()
    params = list(model.parameters())
    lam, lr = 0.1, 0.5
    G = hk.GGNOperator(model, criterion, (x, y)).dense()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(criterion(model(x), y), params)])
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    expected = theta0 - lr * torch.linalg.solve(G + lam * torch.eye(len(g), dtype=torch.float64), g)

    opt = hk.optim.NewtonCG(params, lr=lr, curvature="ggn", damping=lam, adapt_damping=False, max_cg_iters=200,
                            cg_tol=1e-12)

    def closure():
        opt.zero_grad()
        outputs = model(x)
        return criterion(outputs, y), outputs

    opt.step(closure)
    theta1 = torch.cat([p.detach().reshape(-1) for p in params])
    assert ((theta1 - expected).norm() / (expected - theta0).norm()).item() < 1e-8
    info = opt.last_step_info
    assert info["converged"] and info["relative_residual"] <= 1e-12
    assert info["num_products"] == info["cg_iterations"] <= 200


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(curvature="fisher"), "curvature"),
        (dict(damping=-1.0), "damping"),
        (dict(damping=0.0), "damping"),  # adapt_damping=True cannot grow a zero damping
        (dict(max_cg_iters=0), "max_cg_iters"),
        (dict(cg_tol=-1e-3), "cg_tol"),
        (dict(warm_start_decay=1.5), "warm_start_decay"),
        (dict(adapt_damping="yes"), "adapt_damping"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hk.optim.NewtonCG([torch.zeros(2, requires_grad=True)], **kwargs)


def test_closure_contract():
    theta = torch.zeros(2, requires_grad=True)
    ggn = hk.optim.NewtonCG([theta], curvature="ggn")
    with pytest.raises(ValueError, match="outputs"):
        ggn.step(lambda: (theta**2).sum())
    with pytest.raises(TypeError, match="closure"):
        ggn.step()
    with pytest.raises(ValueError, match="computed from"):
        ggn.step(lambda: ((theta**2).sum(), theta * 2.0))  # the loss does not use the outputs
    hessian = hk.optim.NewtonCG([theta], curvature="hessian", damping=0.0, adapt_damping=False)
    assert hessian.step(lambda: ((theta - 1) ** 2).sum()).item() == 2.0
    assert torch.allclose(theta.detach(), torch.ones(2))


def test_after_rejected_steps_the_damping_grows_until_newton_converges():
    # f(x) = sqrt(1 + x^2): undamped Newton from x = 2 lands at x = -8 (and diverges from there)
    x = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = hk.optim.NewtonCG([x], curvature="hessian", damping=1e-8, min_damping=1e-8)

    def closure():
        opt.zero_grad()
        return torch.sqrt(1 + x**2).sum()

    for _ in range(80):  # the damping grows until steps are accepted, then the minimum is reached
        opt.step(closure)
    assert abs(x.item()) < 1e-6 and opt.damping >= 1e-8


def test_damping_never_falls_below_min_damping():
    x = torch.nn.Parameter(torch.tensor([3.0, -1.0], dtype=torch.float64))
    opt = hk.optim.NewtonCG([x], curvature="hessian", lr=0.5, damping=1.0, min_damping=1e-3)

    def closure():
        opt.zero_grad()
        return (x**2).sum()

    for _ in range(40):
        opt.step(closure)
    assert opt.damping == pytest.approx(1e-3)


def test_a_rejected_step_restores_the_parameters_exactly():
    x = torch.nn.Parameter(torch.tensor([20.123]))
    x0 = x.detach().clone()
    opt = hk.optim.NewtonCG([x], curvature="hessian", damping=1e-6, min_damping=1e-6)

    def closure():
        opt.zero_grad()
        return torch.sqrt(1 + x**2).sum()

    opt.step(closure)
    assert opt.last_step_info["rejected"] and torch.equal(x.detach(), x0)  # not x0 + step - step (rounded)
