"""hk.optim.RegularizedNewton (Semenov, Jaggi & Doikov, ICLR 2026, Algorithm 1) and its empirical
Fisher operator: the step against the dense formula in float64 with each curvature (dense matrices
from hesskit's full-data operators, built independently of the optimizer), Algorithm 1's search
replayed by an independent reference, the acceptance rule and gamma updates derived by hand on
f(x) = x^4 and on an indefinite f(x) = x^4 - x^2, linear convergence on a strongly convex logistic
regression, refused steps that leave the model exactly as it was, a state_dict round trip, bad
arguments. The contract every optimizer shares (dtypes, param groups, the model left alone, closure
errors) is in test_contract.py."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesskit as hk
from hesskit.optim.regularized_newton import (GAMMA_MAX, LossEmpiricalFisherOperator, accepts,
                                              regularized_newton_step)

OPERATORS = {"hessian": hk.HessianOperator, "ggn": hk.GGNOperator, "fisher": hk.EmpiricalFisherOperator}


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def mlp_problem(loss: str = "ce"):
    """A 4-5-3 tanh MLP (43 parameters) on 24 samples, float64."""
    x, y = hk.data.classification(n=24, dim=4, num_classes=3, seed=1)
    torch.manual_seed(0)
    model = hk.models.MLP(4, (5,), 3, activation="tanh").double()
    if loss == "mse":
        return model, nn.MSELoss(), x.double(), F.one_hot(y, 3).double()
    return model, nn.CrossEntropyLoss(), x.double(), y


def closure_for(opt, model, criterion, x, y, outputs: bool):
    def closure():
        opt.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        return (loss, out) if outputs else loss

    return closure


def reference_search(f, grad, H, x, gamma, max_trials=40):
    """Algorithm 1's search for one step, from the paper's equations, with a dense H~ (float64):
    returns (x_new or None, gammas tried, accepted gamma or None)."""
    g = grad(x)
    tried = []
    for _ in range(max_trials):
        lam = g.norm().item() / gamma
        tried.append(gamma)
        A = H + lam * torch.eye(len(x), dtype=x.dtype)
        if torch.linalg.eigvalsh(A).min() <= 0:
            gamma /= 2
            continue
        d = -torch.linalg.solve(A, g)
        if f(x) - f(x + d) >= grad(x + d).norm().item() ** 2 / (8 * lam):
            return x + d, tried, gamma
        gamma /= 2
    return None, tried, None


# --------------------------------------------------------------------- the step against dense answers
def test_regularized_newton_step_is_the_dense_formula():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    H, g = B @ B.T, torch.randn(6, generator=gen, dtype=torch.float64)
    d, lam = regularized_newton_step(H, g, gamma=0.3)
    assert lam == pytest.approx(g.norm().item() / 0.3, rel=1e-15)
    expected = -torch.linalg.solve(H + lam * torch.eye(6, dtype=torch.float64), g)
    assert torch.allclose(d, expected, rtol=1e-12, atol=0)
    assert d.norm() <= 0.3  # ||d|| <= ||g|| / lambda = gamma for H >= 0
    # indefinite: eigenvalue -5 with lambda = ||g|| / gamma < 5 has no step
    H_ind = torch.diag(torch.tensor([-5.0, 1.0, 2.0], dtype=torch.float64))
    g3 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    assert regularized_newton_step(H_ind, g3, gamma=1.0)[0] is None  # lambda = sqrt(3) < 5
    assert regularized_newton_step(H_ind, g3, gamma=0.1)[0] is not None  # lambda = 17.3 > 5


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_empirical_fisher_operator_equals_hesskits_full_data_operator(loss):
    model, criterion, x, y = mlp_problem(loss)
    out = model(x)
    op = LossEmpiricalFisherOperator(criterion(out, y), out, list(model.parameters()))
    reference = hk.EmpiricalFisherOperator(model, criterion, (x, y)).dense()
    assert op.shape == reference.shape and op.num_samples == 24
    assert torch.allclose(op.dense(), reference, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_three_steps_replay_algorithm_1_with_the_dense_curvature(curvature, solver):
    """Each step: the dense H~ of hesskit's full-data operator at the current point, then the
    reference search; the optimizer must land on the same point with the same gammas."""
    model, criterion, x, y = mlp_problem()
    params = list(model.parameters())
    opt = hk.optim.RegularizedNewton(params, curvature=curvature, gamma=4.0, solver=solver, max_cg_iters=200,
                                     cg_tol=1e-13)
    closure = closure_for(opt, model, criterion, x, y, curvature != "hessian")
    twin = copy.deepcopy(model)
    twin_params = list(twin.parameters())

    def at(theta):
        torch.nn.utils.vector_to_parameters(theta, twin_params)

    def f(theta):
        at(theta)
        with torch.no_grad():
            return criterion(twin(x), y).item()

    def grad(theta):
        at(theta)
        return flat(torch.autograd.grad(criterion(twin(x), y), twin_params))

    gamma, retried = 4.0, 0
    for _ in range(3):
        theta = flat(params)
        at(theta)
        H = OPERATORS[curvature](twin, criterion, (x, y)).dense()
        expected, tried, accepted_gamma = reference_search(f, grad, H, theta, gamma)
        assert expected is not None
        opt.step(closure)
        info = opt.last_step_info
        assert [t["gamma"] for t in info["log"]] == tried
        assert info["accepted"] and info["gamma"] == accepted_gamma and info["retries"] == len(tried) - 1
        assert info["gamma_next"] == opt.gamma == 2 * accepted_gamma
        assert torch.allclose(flat(params), expected, rtol=1e-9, atol=1e-12)
        assert info["step_norm"] <= accepted_gamma * (1 + 1e-12) or curvature == "hessian"
        gamma, retried = opt.gamma, retried + info["retries"]
        assert info["solver"] == solver
        assert info["closure_calls"] == 1 + sum(1 for t in info["log"] if not math.isnan(t["new_loss"]))
    assert retried > 0  # the search was exercised (gamma 4 is too large for this MLP at the start)


# --------------------------------------------------------------------- the search by hand
def x4_closure(opt, x, fn=lambda t: t**4):
    def closure():
        opt.zero_grad()
        return fn(x).sum()

    return closure


def test_acceptance_rule_and_gamma_updates_by_hand_on_x4():
    """f(x) = x^4 at x = 1: g = 4, H = 12, d = -4 / (12 + lambda), lambda = 4 / gamma.
    gamma 64: lambda 1/16, x+ = 0.668394, f+ = 0.199586, g+ = 1.194420, ||g+||^2/(8 lambda) = 2.853 > 0.800: reject;
    gamma 32: lambda 1/8,  x+ = 0.670103, f+ = 0.201635, g+ = 1.203607, required 1.449 > 0.798: reject;
    gamma 16: lambda 1/4,  x+ = 0.673469, f+ = 0.205718, g+ = 1.221838, required 0.746 < 0.794: accept;
    gamma <- 32 for the next step."""
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = hk.optim.RegularizedNewton([x], gamma=64.0)
    opt.step(x4_closure(opt, x))
    info = opt.last_step_info
    assert [t["gamma"] for t in info["log"]] == [64.0, 32.0, 16.0]
    assert [t["accepted"] for t in info["log"]] == [False, False, True]
    assert info["retries"] == 2 and info["gamma"] == 16.0 and opt.gamma == 32.0 == info["gamma_next"]
    assert info["lambda"] == 0.25 and info["closure_calls"] == 4 and info["solver"] == "cholesky"
    assert x.item() == pytest.approx(1 - 4 / 12.25, rel=1e-14)
    for t, (f_new, g_new) in zip(info["log"], [(0.199586, 1.194420), (0.201635, 1.203607), (0.205718, 1.221838)]):
        assert t["new_loss"] == pytest.approx(f_new, abs=2e-6) and t["new_grad_norm"] == pytest.approx(g_new, abs=2e-6)
        assert accepts(1.0, t["new_loss"], t["new_grad_norm"], t["lambda"]) == t["accepted"]
    assert info["required"] == pytest.approx(1.221838**2 / 2, rel=1e-5)
    assert x.grad.item() == 4.0  # .grad holds the step's gradient at x = 1, not a trial's
    # the next step starts at gamma 32 = 2 * 16
    opt.step(x4_closure(opt, x))
    assert opt.last_step_info["log"][0]["gamma"] == 32.0


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_indefinite_hessian_trials_are_rejected_without_a_closure_call(solver):
    """f(x) = x^4 - x^2 at x = 0.1: g = -0.196, H = -1.88. lambda = 0.196 / gamma makes H + lambda
    positive only for gamma < 0.104: gammas 1, 1/2, 1/4, 1/8 are rejected without evaluating f,
    gamma 1/16 (lambda 3.136) gives d = 0.196 / 1.256 and passes the test."""
    x = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    opt = hk.optim.RegularizedNewton([x], solver=solver)
    opt.step(x4_closure(opt, x, lambda t: t**4 - t**2))
    info = opt.last_step_info
    assert [t["gamma"] for t in info["log"]] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert [t["accepted"] for t in info["log"]] == [False] * 4 + [True]
    assert all(math.isnan(t["new_loss"]) for t in info["log"][:4])
    assert info["closure_calls"] == 2 and info["retries"] == 4
    assert x.item() == pytest.approx(0.1 + 0.196 / (-1.88 + 0.196 * 16), rel=1e-12)


def test_a_zero_gradient_takes_no_step():
    x = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    opt = hk.optim.RegularizedNewton([x])
    opt.step(x4_closure(opt, x, lambda t: t**2))
    info = opt.last_step_info
    assert x.item() == 0.0 and info["accepted"] and info["trials"] == 0 and info["closure_calls"] == 1
    assert opt.gamma == 1.0


# --------------------------------------------------------------------- convergence
def logistic(n=200, dim=5, l2=1e-2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
    return x, y, l2


def logistic_loss(theta, x, y, l2):
    out = x @ theta
    return F.binary_cross_entropy_with_logits(out, y) + 0.5 * l2 * theta.pow(2).sum(), out


@pytest.mark.parametrize("curvature, bound, steps", [("hessian", 0.95, 15), ("ggn", 0.95, 15), ("fisher", 0.98, 60)])
def test_global_linear_convergence_on_strongly_convex_logistic_regression(curvature, bound, steps):
    """From 20 units away (f - f* = 8.9 at the start): f* by closed-form Newton; every step contracts
    f - f* by at least the bound until 1e-10, reached within `steps` steps. Measured: worst factors
    0.931 (Hessian), 0.930 (GGN), 0.964 (Fisher; 1e-10 in 34 steps), both Newton curvatures in 9
    steps; the worst factor is the first step's, far from the minimum."""
    x, y, l2 = logistic()
    theta = torch.zeros(5, dtype=torch.float64)
    for _ in range(30):  # Newton's method on the closed form: f*
        p = torch.sigmoid(x @ theta)
        g = x.T @ (p - y) / len(y) + l2 * theta
        H = x.T @ (x * (p * (1 - p))[:, None]) / len(y) + l2 * torch.eye(5, dtype=torch.float64)
        theta = theta - torch.linalg.solve(H, g)
    f_star = logistic_loss(theta, x, y, l2)[0].item()

    w = torch.full((5,), 20 / math.sqrt(5), dtype=torch.float64, requires_grad=True)
    opt = hk.optim.RegularizedNewton([w], curvature=curvature)

    def closure():
        opt.zero_grad()
        loss, out = logistic_loss(w, x, y, l2)
        return loss if curvature == "hessian" else (loss, out)

    gaps = [logistic_loss(w, x, y, l2)[0].item() - f_star]
    for _ in range(steps):
        opt.step(closure)
        gaps.append(logistic_loss(w, x, y, l2)[0].item() - f_star)
        if gaps[-1] < 1e-10:
            break
    assert gaps[-1] < 1e-10, gaps[-1]
    factors = [b / a for a, b in zip(gaps, gaps[1:]) if a > 1e-10]
    assert max(factors) < bound, max(factors)


def test_cg_and_cholesky_agree_on_an_mlp():
    results = []
    for solver in ("cholesky", "cg"):
        model, criterion, x, y = mlp_problem()
        opt = hk.optim.RegularizedNewton(model.parameters(), curvature="ggn", solver=solver, cg_tol=1e-13,
                                         max_cg_iters=200)
        closure = closure_for(opt, model, criterion, x, y, True)
        for _ in range(5):
            opt.step(closure)
        results.append((flat(model.parameters()), opt.gamma))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-8, atol=1e-10) and results[0][1] == results[1][1]


# --------------------------------------------------------------------- refusals leave the model alone
def test_a_refused_step_leaves_the_model_exactly_as_it_was():
    """x^4 at x = 1 with gamma 64 and a single trial: rejected (see above), so the step is refused."""
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = hk.optim.RegularizedNewton([x], gamma=64.0, max_trials=1)
    version = x._version
    with pytest.warns(RuntimeWarning, match="no trial step passed the acceptance test"):
        loss = opt.step(x4_closure(opt, x))
    info = opt.last_step_info
    assert x.item() == 1.0 and not info["accepted"] and info["retries"] == 1 and info["trials"] == 1
    assert loss.item() == 1.0 and math.isnan(info["new_loss"]) and info["step_norm"] == 0.0
    assert opt.gamma == 32.0  # halved once, kept
    assert x.grad.item() == 4.0 and x.requires_grad and x._version > version  # an ordinary write at the end
    assert torch.equal(opt.state[x]["update"], torch.zeros(1, dtype=torch.float64))


def test_refused_mlp_step_restores_every_parameter_bitwise_and_keeps_modes():
    model, criterion, x, y = mlp_problem()
    model.eval()
    list(model.modules())[1].train()
    modes = [m.training for m in model.modules()]
    before = [p.detach().clone() for p in model.parameters()]
    opt = hk.optim.RegularizedNewton(model.parameters(), curvature="ggn", gamma=1e6, max_trials=2, solver="cg")

    def closure():  # every trial point is declared non-finite: both trials fail
        opt.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        return (loss * math.inf if moved else loss), out

    with pytest.warns(RuntimeWarning):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad and p.grad is not None and p.grad.grad_fn is None for p in model.parameters())
    assert [t["new_loss"] for t in opt.last_step_info["log"]] == [math.inf, math.inf]


def test_an_error_inside_a_trial_restores_the_parameters():
    model, criterion, x, y = mlp_problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = hk.optim.RegularizedNewton(model.parameters())
    calls = []

    def closure():
        opt.zero_grad()
        calls.append(1)
        if len(calls) > 1:
            raise KeyError("data loader broke")
        return criterion(model(x), y)

    with pytest.raises(KeyError):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_step_that_rounds_away_is_refused_at_once():
    """f(x) = x / 2 in float32 at x = 1 with gamma 1e-10: H = 0, so d = -g / lambda = -gamma, and
    1 - 1e-10 rounds to 1: the search stops there (no closure call, gamma kept) instead of halving on."""
    x = torch.tensor([1.0], dtype=torch.float32, requires_grad=True)
    opt = hk.optim.RegularizedNewton([x], gamma=1e-10)
    with pytest.warns(RuntimeWarning, match="parameters are unchanged"):
        opt.step(x4_closure(opt, x, lambda t: t / 2))
    info = opt.last_step_info
    assert info["trials"] == 1 and info["log"][0]["reason"] == "x + d rounds to x" and info["closure_calls"] == 1
    assert not info["accepted"] and x.item() == 1.0 and opt.gamma == 1e-10


# --------------------------------------------------------------------- state_dict, errors
def test_state_dict_round_trip_continues_identically():
    model, criterion, x, y = mlp_problem()
    opt = hk.optim.RegularizedNewton(model.parameters(), curvature="fisher", gamma=8.0)
    closure = closure_for(opt, model, criterion, x, y, True)
    for _ in range(3):
        opt.step(closure)
    buffer, saved_model = io.BytesIO(), copy.deepcopy(model.state_dict())
    torch.save(opt.state_dict(), buffer)
    for _ in range(3):
        opt.step(closure)

    twin, _, _, _ = mlp_problem()
    twin.load_state_dict(saved_model)
    twin_opt = hk.optim.RegularizedNewton(twin.parameters(), curvature="hessian")  # settings come from the state
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer))
    assert twin_opt.curvature == "fisher" and twin_opt.gamma != 8.0
    twin_closure = closure_for(twin_opt, twin, criterion, x, y, True)
    for _ in range(3):
        twin_opt.step(twin_closure)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert twin_opt.gamma == opt.gamma


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr: expected a value in"),
    (dict(curvature="bfgs"), "curvature: expected one of"),
    (dict(gamma=0.0), "gamma: expected a value in"),
    (dict(gamma=math.inf), "gamma: expected a finite number"),
    (dict(solver="lu"), "solver: expected one of"),
    (dict(max_trials=0), "max_trials: expected an integer >= 1"),
    (dict(max_cg_iters=2.5), "max_cg_iters: expected an integer >= 1"),
    (dict(cg_tol=-1.0), "cg_tol: expected a value in"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        hk.optim.RegularizedNewton([w], **kwargs)


def test_bad_closures_and_parameters():
    with pytest.raises(ValueError, match="params: expected at least one parameter that requires grad"):
        hk.optim.RegularizedNewton([torch.zeros(3)])
    model, criterion, x, y = mlp_problem()
    for curvature in ("ggn", "fisher"):
        opt = hk.optim.RegularizedNewton(model.parameters(), curvature=curvature)
        with pytest.raises(ValueError, match=r"needs closure\(\) to return \(loss, outputs\)"):
            opt.step(closure_for(opt, model, criterion, x, y, False))

        def unrelated():
            opt.zero_grad()
            out = model(x)
            return criterion(model(x), y), out.detach().requires_grad_()

        with pytest.raises(ValueError, match=f"closure: for curvature='{curvature}' return"):
            opt.step(unrelated)
    out = model(x)
    with pytest.raises(ValueError, match="outputs: expected the"):
        LossEmpiricalFisherOperator(criterion(out, y), out.detach(), list(model.parameters()))
    with pytest.raises(ValueError, match="loss: expected a scalar"):
        LossEmpiricalFisherOperator(F.cross_entropy(out, y, reduction="none"), out, list(model.parameters()))


def test_gamma_doubling_stops_at_gamma_max():
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = hk.optim.RegularizedNewton([x], gamma=GAMMA_MAX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(x4_closure(opt, x, lambda t: (t - 3) ** 2))  # a quadratic: the Newton step is accepted
    assert opt.last_step_info["accepted"] and opt.gamma == GAMMA_MAX and x.item() == pytest.approx(3.0, rel=1e-12)
