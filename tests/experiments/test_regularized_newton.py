import matplotlib

matplotlib.use("Agg")

# Notebook 17's computations: the baselines' searches by hand (gradient descent's adaptive L, Armijo
# backtracking), the problems (start point, f* against an independent Newton in closed form), the run
# records and their bookkeeping, the contraction factors, the distance sweep, argument errors. The
# explorer: tests/widgets/test_regularized_newton_explorer.py.

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.regularized_newton import (  # noqa: E402
    LABELS,
    METHODS,
    GradientMethod,
    NewtonLineSearch,
    Run,
    compare,
    distance_sweep,
    linear_rate,
    logistic_problem,
    make_optimizer,
    network_problem,
    run,
    softmax_problem,
)


def scalar_closure(opt, x, fn):
    def closure():
        opt.zero_grad()
        return fn(x).sum()

    return closure


def test_gradient_method_search_by_hand():
    """f = 2 x^2 at x = 1 (g = 4) with L = 1: x - g/L = -3 gives f = 18 > 2 - 16/2 (reject, L = 2);
    -1 gives 2 > 2 - 16/4 (reject, L = 4); 0 gives 0 <= 2 - 16/8 = 0 (accept), then L = 2."""
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = GradientMethod([x])
    loss = opt.step(scalar_closure(opt, x, lambda t: 2 * t**2))
    assert loss.item() == 2.0 and x.item() == 0.0 and opt.L == 2.0
    assert opt.last_step_info == {"closure_calls": 4, "num_products": 0, "accepted": True, "L": 2.0}
    x2 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    refusing = GradientMethod([x2], max_trials=2)  # both rejected: the parameters stay
    refusing.step(scalar_closure(refusing, x2, lambda t: 2 * t**2))
    assert x2.item() == 1.0 and not refusing.last_step_info["accepted"] and refusing.L == 4.0


def test_newton_line_search_backtracks_by_hand():
    """f = sqrt(1 + x^2) at x = 2: g = 2/sqrt(5), H = 5^(-3/2), d = -g/H = -10. Armijo (c = 1e-4):
    t = 1 (x = -8) and t = 1/2 (x = -3) fail, t = 1/4 (x = -0.5) passes. Without the line search the
    full step lands at -8."""
    for line_search, expected, calls in ((True, -0.5, 4), (False, -8.0, 1)):
        x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        opt = NewtonLineSearch([x], line_search=line_search)
        opt.step(scalar_closure(opt, x, lambda t: torch.sqrt(1 + t**2)))
        info = opt.last_step_info
        assert x.item() == pytest.approx(expected, rel=1e-12)
        assert info["closure_calls"] == calls and info["num_products"] == 1 and info["accepted"]
    assert info["t"] == 1.0
    x = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    opt = NewtonLineSearch([x])
    with pytest.raises(ValueError, match="not positive definite"):
        opt.step(scalar_closure(opt, x, lambda t: -t**2))


def closed_form_minimum(problem):
    """Newton's method on the closed-form logistic loss (features and a bias column), float64."""
    Z = torch.cat([problem.x, torch.ones(len(problem.x), 1, dtype=torch.float64)], dim=1)
    theta = torch.zeros(Z.shape[1], dtype=torch.float64)
    for _ in range(40):
        p = torch.sigmoid(Z @ theta)
        g = Z.T @ (p - problem.y) / len(p) + problem.l2 * theta
        H = Z.T @ (Z * (p * (1 - p))[:, None]) / len(p) + problem.l2 * torch.eye(Z.shape[1], dtype=torch.float64)
        theta = theta - torch.linalg.solve(H, g)
    z = Z @ theta
    return (torch.nn.functional.binary_cross_entropy_with_logits(z, problem.y) + 0.5 * problem.l2 * theta @ theta).item()


def test_problems_start_points_and_minimum():
    problem = logistic_problem(l2=1e-2, distance=7.0, seed=3)
    model = problem.model()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert problem.num_params == 31 and theta.dtype == torch.float64
    assert theta.norm().item() == pytest.approx(7.0, rel=1e-12)
    assert torch.equal(theta, torch.cat([p.detach().reshape(-1) for p in problem.model().parameters()]))
    assert problem.f_star == pytest.approx(closed_form_minimum(problem), abs=1e-14)
    other = logistic_problem(l2=1e-2, distance=7.0, seed=4).model()
    assert not torch.equal(next(other.parameters()), next(model.parameters()))
    soft = softmax_problem(distance=2.0, num_samples=100)
    assert soft.num_params == 650 and len(soft.y) == 100 and soft.kind == "multiclass"
    net = network_problem(hidden=4, num_samples=50)
    assert net.f_star is None and not net.convex and net.num_params == 64 * 4 + 4 + 4 * 10 + 10


def test_run_records_every_iterate_and_the_search():
    problem = logistic_problem(distance=10.0)
    r = run(problem, "regnewton-fisher", steps=12, stop_gap=None)
    assert r.steps == 12 and r.status == "ok" and r.label == LABELS["regnewton-fisher"]
    assert len(r.loss) == len(r.gap) == len(r.grad_norm) == len(r.closure_calls) == len(r.seconds) == 13
    assert np.allclose(r.gap, r.loss - problem.f_star, rtol=0, atol=0)
    assert np.all(np.diff(r.loss) <= 0) and np.all(np.diff(r.closure_calls) >= 2)  # a step: >= 1 trial + 1 gradient
    assert np.all(np.diff(r.products) == problem.num_params)  # a dense H~ per step (n <= max_cg_iters)
    assert all(len(v) == 12 for v in r.per_step.values()) and r.per_step["accepted"].all()
    assert np.all(r.per_step["step_norm"] <= r.per_step["gamma"] * (1 + 1e-12))
    # the recorded search is the optimizer's own: replay it
    model = problem.model()
    opt = hk.optim.RegularizedNewton(model.parameters(), curvature="fisher")
    closure = hk.optim.make_closure("loss_outputs", opt, lambda: problem.loss(model))
    gammas = []
    for _ in range(12):
        opt.step(closure)
        gammas.append(opt.last_step_info["gamma"])
    assert r.per_step["gamma"].tolist() == gammas
    assert torch.equal(r.theta, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    with torch.no_grad():
        assert r.grad_norm[0] > r.grad_norm[-1] > 0


def test_run_stops_at_the_gap_on_refusals_and_reads_costs():
    problem = logistic_problem(distance=1.0)
    r = run(problem, "newton-ls", steps=50, stop_gap=1e-10)
    assert r.status == "ok" and r.steps < 50 and r.gap[-1] <= 1e-10 < r.gap[-2]
    k = r.iterations_to(1e-6)
    assert r.gap[int(k)] <= 1e-6 < r.gap[int(k) - 1]
    assert r.cost_to(1e-6) == r.closure_calls[int(k)] and r.cost_to(1e-6, "products") == r.products[int(k)]
    assert math.isinf(r.iterations_to(-1.0)) and math.isinf(r.cost_to(-1.0, "seconds"))
    far = logistic_problem(distance=100.0)  # a near-Newton step from 100 units away overshoots; 2 halvings cannot fix it
    with pytest.warns(RuntimeWarning, match="no trial step passed"):
        refused = run(far, "regnewton-hessian", steps=5, gamma=1e30, max_trials=2)
    assert refused.status == "refused" and refused.steps == 1 and refused.message == "step 1 refused"
    assert refused.loss[-1] == refused.loss[0] and not refused.per_step["accepted"][0]


def test_linear_rate_of_a_geometric_sequence():
    gaps = 0.5 ** np.arange(40)
    r = Run("x", "p", {}, gaps, gaps, gaps, gaps, gaps, gaps)
    rate = linear_rate(r, floor=1e-9)
    assert rate["worst"] == pytest.approx(0.5) and rate["mean"] == pytest.approx(0.5)
    assert rate["steps"] == int(np.sum(gaps[:-1] > 1e-9))
    gaps2 = np.array([1.0, 0.9, 0.09, 0.0])
    r2 = Run("x", "p", {}, gaps2, gaps2, gaps2, gaps2, gaps2, gaps2)
    assert linear_rate(r2, floor=0.0)["worst"] == pytest.approx(0.9)
    assert linear_rate(Run("x", "p", {}, gaps2, gaps2 * 0, gaps2, gaps2, gaps2, gaps2))["steps"] == 0


def test_compare_and_distance_sweep():
    methods = ["regnewton-hessian", "newton-ls", "newton"]
    sweep = distance_sweep(lambda d: logistic_problem(distance=d), [1.0, 30.0], methods, 15)
    assert set(sweep) == set(methods)
    assert all(v["iterations"].shape == (2,) and v["closure_calls"].shape == (2,) for v in sweep.values())
    assert np.isfinite(sweep["regnewton-hessian"]["iterations"]).all()  # converges from both
    assert np.isfinite(sweep["newton"]["iterations"][0]) and math.isinf(sweep["newton"]["iterations"][1])
    runs = compare(logistic_problem(distance=1.0), ["gd", "newton-cg"], {"gd": 3, "newton-cg": 2},
                   settings={"gd": {"L": 8.0}})
    assert runs["gd"].steps == 3 and runs["newton-cg"].steps == 2 and runs["gd"].settings["L"] == 8.0
    assert runs["gd"].loss[0] == runs["newton-cg"].loss[0]  # the same start


def test_make_optimizer_and_errors():
    w = torch.zeros(3, requires_grad=True)
    kinds = {m: make_optimizer(m, [w])[1] for m in METHODS}
    assert kinds["regnewton-hessian"] == "loss" and kinds["regnewton-fisher"] == "loss_outputs"
    assert kinds["newton-cg"] == "loss_outputs" and kinds["gd"] == kinds["newton"] == "loss"
    assert make_optimizer("regnewton-ggn", [w], gamma=3.0)[0].gamma == 3.0
    with pytest.raises(ValueError, match="method: expected one of"):
        make_optimizer("bfgs", [w])
