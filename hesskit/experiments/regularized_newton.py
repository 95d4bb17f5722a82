"""Notebook 17 (`17_regularized_newton.ipynb`): the gradient-regularized Newton method with
approximate Hessians (Semenov, Jaggi & Doikov, "Gradient-Normalized Smoothness for Optimization
with Approximate Hessians", ICLR 2026), against gradient descent, Newton with a line search and
Newton-CG, on full-batch problems.

Problems (`Problem`, float64, one full batch): L2-regularised logistic regression on scikit-learn's
bundled breast-cancer data (`logistic_problem`, 31 parameters), softmax regression on the digits
(`softmax_problem`, 650 parameters), both strongly convex, with their minimum f* from Newton's
method to the rounding floor (`Problem.f_star`); and a small tanh MLP on the digits
(`network_problem`), non-convex. Every run of a problem starts from the same point: for the convex
problems at a chosen distance from the origin along a seeded random direction, for the network at
PyTorch's default initialisation.

Methods (`METHODS`, `make_optimizer`): `hk.optim.RegularizedNewton` with the exact Hessian, the
GGN or the empirical Fisher; gradient descent with the adaptive step-size search of the official
code's `gradient_method` (`GradientMethod`); Newton with an Armijo backtracking line search and
without one (`NewtonLineSearch`); `hk.optim.NewtonCG` (Martens 2010) at its defaults. `run`
records a `Run` per method: f(x_k) - f*, ||grad f(x_k)||, the cumulative closure calls (loss and
gradient evaluations), curvature products and seconds, and the regularized Newton's gamma,
lambda, retries, acceptance and step length per step. `linear_rate` reads a run's contraction
factors (f_{k+1} - f*) / (f_k - f*); `compare` runs several methods on one problem from the same
start, `distance_sweep` counts the iterations to a target gap from start points ever farther away.
The notebook's explorer is `hesskit.widgets.regularized_newton.RegularizedNewtonExplorer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.operators import LossHessianOperator
from ..optim import ClosureOptimizer, NewtonCG, RegularizedNewton, make_closure
from ..optim.newton_cg import conjugate_gradient
from .training import run_to_end, training_steps

__all__ = [
    "METHODS",
    "LABELS",
    "Problem",
    "Run",
    "GradientMethod",
    "NewtonLineSearch",
    "logistic_problem",
    "softmax_problem",
    "network_problem",
    "make_optimizer",
    "run",
    "compare",
    "distance_sweep",
    "linear_rate",
]

METHODS = ("regnewton-hessian", "regnewton-ggn", "regnewton-fisher", "gd", "newton-ls", "newton", "newton-cg")
LABELS = {
    "regnewton-hessian": "reg. Newton, Hessian",
    "regnewton-ggn": "reg. Newton, GGN",
    "regnewton-fisher": "reg. Newton, Fisher",
    "gd": "gradient descent (adaptive)",
    "newton-ls": "Newton + line search",
    "newton": "Newton, no line search",
    "newton-cg": "Newton-CG (GGN, LM damping)",
}


# --------------------------------------------------------------------------- baselines
class GradientMethod(ClosureOptimizer):
    """Gradient descent with an adaptive step 1/L (Nesterov's universal search, as the official
    code's `gradient_method`): try x+ = x - g / L; if

        f(x+) <= f(x) + g^T (x+ - x) + L/2 ||x+ - x||^2

    accept and halve L (not below `L_min`), else double L and retry (at most `max_trials`; if none
    passes the step is refused and the parameters stay). Defaults as the official code: L_0 = 1,
    L_min = 1e-5, 30 trials. Closure: returns the loss (no backward)."""

    settings = ("L", "L_min", "max_trials")

    def __init__(self, params, lr: float = 1.0, L: float = 1.0, L_min: float = 1e-5, max_trials: int = 30):
        super().__init__(params, dict(lr=lr))
        self.L, self.L_min, self.max_trials = float(L), float(L_min), int(max_trials)
        self.last_step_info: dict = {}

    def step(self, closure=None) -> Tensor:
        params = self._trainable()
        ev = self._evaluate(closure)
        g = torch.cat([t.reshape(-1) for t in ev.grads])
        loss, start, calls, accepted = float(ev.loss.detach()), [p.detach().clone() for p in params], 1, False
        with torch.no_grad():
            for _ in range(self.max_trials):
                for p, p0, gp in zip(params, start, ev.grads):
                    p.copy_(p0 - gp / self.L)
                new = float(closure())
                calls += 1
                if math.isfinite(new) and new <= loss - float(g @ g) / (2 * self.L):  # the bound at x+ = x - g/L
                    self.L, accepted = max(self.L / 2, self.L_min), True
                    break
                self.L *= 2
            if not accepted:
                for p, p0 in zip(params, start):
                    p.copy_(p0)
        self.last_step_info = {"closure_calls": calls, "num_products": 0, "accepted": accepted, "L": self.L}
        return ev.loss.detach()


class NewtonLineSearch(ClosureOptimizer):
    """Newton's method with the exact Hessian and an Armijo backtracking line search (Nocedal &
    Wright, Numerical Optimization, Algorithm 3.1: t = 1, 1/2, 1/4, ... until
    f(x + t d) <= f(x) + c t g^T d, c = 1e-4, at most 50 halvings, else the step is refused). The
    Newton direction d = -H^{-1} g comes from a dense Cholesky factorisation for n <= 100 parameters
    (`solver="auto"`), else from conjugate gradient run to a relative residual of `cg_tol` = 1e-10
    (at most 2n products): for convex problems, where H is positive definite. `line_search=False`
    takes the full step d whatever happens: pure Newton, which need not converge from far away.
    Closure: the loss."""

    settings = ("line_search", "c", "solver", "cg_tol")

    def __init__(self, params, lr: float = 1.0, line_search: bool = True, c: float = 1e-4, solver: str = "auto",
                 cg_tol: float = 1e-10):
        super().__init__(params, dict(lr=lr))
        self.line_search, self.c, self.solver, self.cg_tol = bool(line_search), float(c), solver, float(cg_tol)
        self.last_step_info: dict = {}

    def _direction(self, op, g: Tensor) -> Tensor:
        solver = self.solver if self.solver != "auto" else ("cholesky" if g.numel() <= 100 else "cg")
        if solver == "cholesky":
            L, info = torch.linalg.cholesky_ex(op.dense())
            if int(info) != 0:
                raise ValueError("NewtonLineSearch: the Hessian is not positive definite here (a non-convex problem)")
            return -torch.cholesky_solve(g.reshape(-1, 1), L).reshape(-1)
        result = conjugate_gradient(lambda v: op @ v, -g, tol=self.cg_tol, max_iters=2 * g.numel())
        if result.negative_curvature:
            raise ValueError("NewtonLineSearch: the Hessian is not positive definite here (a non-convex problem)")
        return result.x

    def step(self, closure=None) -> Tensor:
        params = self._trainable()
        with torch.enable_grad():
            ev = self._evaluate(closure, create_graph=True)
            g = torch.cat([t.detach().reshape(-1) for t in ev.grads])
            op = LossHessianOperator(ev.loss, params, ev.grads)
            d = self._direction(op, g)
        loss, products = float(ev.loss.detach()), op.num_matvecs
        del ev, op
        start, calls, t, accepted = [p.detach().clone() for p in params], 1, 1.0, False
        slope = float(g @ d)
        with torch.no_grad():
            for _ in range(51 if self.line_search else 1):
                offset = 0
                for p, p0 in zip(params, start):
                    p.copy_(p0 + t * d[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
                if not self.line_search:
                    accepted = True
                    break
                new = float(closure())
                calls += 1
                if math.isfinite(new) and new <= loss + self.c * t * slope:
                    accepted = True
                    break
                t /= 2
            if not accepted:
                for p, p0 in zip(params, start):
                    p.copy_(p0)
        self.last_step_info = {"closure_calls": calls, "num_products": products, "accepted": accepted, "t": t}
        return torch.tensor(loss, dtype=g.dtype)


# --------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One full-batch problem: `loss(model)` -> (loss, outputs) with the L2 term `l2 / 2 ||theta||^2`
    (on every parameter) added, a fresh model at the start point from `model()`, and the minimum
    `f_star` (convex problems: Newton with a line search in float64, run to its rounding floor;
    None for the network)."""

    name: str
    build: Callable[[], nn.Module]  # a fresh model at the start point x0
    x: Tensor
    y: Tensor
    kind: str  # "binary" (BCE on one logit) or "multiclass" (cross-entropy)
    l2: float
    convex: bool

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model().parameters())

    def model(self) -> nn.Module:
        return self.build()

    def loss(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        out = model(self.x)
        if self.kind == "binary":
            out = out.squeeze(-1)
            data = F.binary_cross_entropy_with_logits(out, self.y)
        else:
            data = F.cross_entropy(out, self.y)
        reg = 0.5 * self.l2 * sum(p.pow(2).sum() for p in model.parameters()) if self.l2 else 0.0
        return data + reg, out

    def value(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(self.loss(model)[0])

    @cached_property
    def f_star(self) -> float | None:
        """min f, from Newton with a line search in float64 until the loss stops decreasing
        (quadratic convergence: a handful of steps past the first that reaches the floor)."""
        if not self.convex:
            return None
        model = self.model()
        opt = NewtonLineSearch(model.parameters())
        closure = make_closure("loss", opt, lambda: self.loss(model))
        best = self.value(model)
        for _ in range(200):
            opt.step(closure)
            value = self.value(model)
            if not opt.last_step_info["accepted"] or value >= best:
                best = min(best, value)
                break
            best = value
        return best


def _start(model: nn.Module, distance: float, seed: int) -> nn.Module:
    """Put the parameters at `distance` (Euclidean) from zero, along a seeded Gaussian direction."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    direction = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=torch.float64)
    direction *= distance / direction.norm()
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(direction[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def logistic_problem(l2: float = 1e-3, distance: float = 10.0, seed: int = 0) -> Problem:
    """L2-regularised logistic regression on scikit-learn's bundled breast-cancer data (569 samples,
    30 standardised features, a bias: 31 parameters), float64; the start point is `distance` from 0."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(X, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y, dtype=torch.float64)
    build = lambda: _start(nn.Linear(30, 1).double(), distance, seed)  # noqa: E731
    return Problem("logistic regression (breast cancer)", build, x, y, "binary", l2, True)


def softmax_problem(l2: float = 1e-3, distance: float = 10.0, seed: int = 0, num_samples: int | None = None) -> Problem:
    """L2-regularised softmax regression on the 1,438 training digits (64 pixels in [0, 1], 10
    classes: 650 parameters), float64; the start point is `distance` from 0."""
    from .. import data

    (x, y), _ = data.digits(flatten=True)
    x = x.double()[:num_samples]
    y = y[:num_samples]
    build = lambda: _start(nn.Linear(64, 10).double(), distance, seed)  # noqa: E731
    return Problem("softmax regression (digits)", build, x, y, "multiclass", l2, True)


def network_problem(hidden: int = 8, num_samples: int = 512, l2: float = 0.0, seed: int = 0) -> Problem:
    """A 64-hidden-10 tanh MLP on the first `num_samples` training digits, float64, at PyTorch's
    default initialisation after `torch.manual_seed(seed)`: non-convex, f* unknown."""
    from .. import data

    (x, y), _ = data.digits(flatten=True)

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()

    return Problem(f"64-{hidden}-10 tanh MLP (digits)", build, x.double()[:num_samples], y[:num_samples],
                   "multiclass", l2, False)


# --------------------------------------------------------------------------- runs
def make_optimizer(method: str, params, **kwargs) -> ClosureOptimizer:
    """The optimizer of `method` (one of METHODS) and the closure kind it needs, as (optimizer, kind)."""
    if method.startswith("regnewton-"):
        curvature = method.split("-", 1)[1]
        opt = RegularizedNewton(params, curvature=curvature, **kwargs)
        return opt, "loss" if curvature == "hessian" else "loss_outputs"
    if method == "gd":
        return GradientMethod(params, **kwargs), "loss"
    if method in ("newton-ls", "newton"):
        return NewtonLineSearch(params, line_search=method == "newton-ls", **kwargs), "loss"
    if method == "newton-cg":
        return NewtonCG(params, **kwargs), "loss_outputs"
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


@dataclass
class Run:
    """One method on one problem. Arrays have one entry per iterate x_0..x_K (K = steps taken):
    `loss` f(x_k), `gap` f(x_k) - f* (nan without f*), `grad_norm`, cumulative `closure_calls`,
    `products` (curvature products) and `seconds` spent to reach x_k. `per_step` (K entries)
    holds the regularized Newton's gamma, lambda, retries, accepted and step_norm (nan for other methods).
    `status` is "ok", "diverged" (a non-finite loss) or "refused" (a step could not be taken:
    the run stopped there, with the optimizer's message); `theta` the final parameters, flattened."""

    method: str
    problem: str
    settings: dict
    loss: np.ndarray
    gap: np.ndarray
    grad_norm: np.ndarray
    closure_calls: np.ndarray
    products: np.ndarray
    seconds: np.ndarray
    per_step: dict = field(default_factory=dict)
    status: str = "ok"
    message: str = ""
    theta: Tensor | None = None  # the final parameters, flattened

    @property
    def label(self) -> str:
        return LABELS.get(self.method, self.method)

    @property
    def steps(self) -> int:
        return len(self.loss) - 1

    def iterations_to(self, gap: float) -> float:
        """The first k with f(x_k) - f* <= gap (inf if never)."""
        hit = np.flatnonzero(self.gap <= gap)
        return float(hit[0]) if len(hit) else math.inf

    def cost_to(self, gap: float, axis: str = "closure_calls") -> float:
        """closure calls, products or seconds spent until f(x_k) - f* <= gap (inf if never)."""
        k = self.iterations_to(gap)
        return math.inf if math.isinf(k) else float(getattr(self, axis)[int(k)])


def _grad_norm(problem: Problem, model: nn.Module) -> float:
    with torch.enable_grad():
        loss, _ = problem.loss(model)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))


def run(problem: Problem, method: str, steps: int, stop_gap: float | None = 1e-13, **kwargs) -> Run:
    """`steps` steps of `method` from the problem's start point, recording every iterate (see `Run`).
    With `stop_gap`, a convex run stops once f(x_k) - f* <= stop_gap (the rounding floor of float64
    is near 1e-16 |f*|); a step an optimizer refuses ends the run with status "refused"."""
    model = problem.model()
    opt, kind = make_optimizer(method, model.parameters(), **kwargs)
    closure = make_closure(kind, opt, lambda: problem.loss(model))
    f_star = problem.f_star
    losses, norms = [problem.value(model)], [_grad_norm(problem, model)]
    calls, products, seconds = [0], [0], [0.0]
    per_step = {key: [] for key in ("gamma", "lambda", "retries", "accepted", "step_norm")}
    state = {"status": "ok", "message": ""}

    def step(t: int):
        return opt.step(closure)

    def after_step(t: int, value: float) -> str | None:
        info = opt.last_step_info
        losses.append(problem.value(model))
        norms.append(_grad_norm(problem, model))
        calls.append(calls[-1] + info.get("closure_calls", 1))
        products.append(products[-1] + info.get("num_products", 0))
        for key in per_step:
            per_step[key].append(float(info.get(key, math.nan)))
        if not math.isfinite(losses[-1]):
            return f"loss {losses[-1]} after step {t}"
        if not info.get("accepted", True):
            state["status"], state["message"] = "refused", f"step {t} refused"
            return state["message"]
        if f_star is not None and stop_gap is not None and losses[-1] - f_star <= stop_gap:
            return "stop"
        return None

    log = run_to_end(training_steps(step, steps, after_step=after_step, label=method))
    seconds += list(np.cumsum(log.seconds[: len(losses) - 1]))
    status = state["status"] if state["status"] != "ok" else ("ok" if log.ok or log.message == "stop" else "diverged")
    message = state["message"] if state["status"] != "ok" else ("" if log.message == "stop" else log.message)
    gap = np.asarray(losses) - f_star if f_star is not None else np.full(len(losses), np.nan)
    return Run(method, problem.name, dict(kwargs, steps=steps), np.asarray(losses), gap, np.asarray(norms),
               np.asarray(calls, dtype=float), np.asarray(products, dtype=float), np.asarray(seconds[: len(losses)]),
               {k: np.asarray(v) for k, v in per_step.items()}, status, message,
               torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def compare(problem: Problem, methods: Sequence[str], steps: int | dict[str, int],
            settings: dict[str, dict] | None = None, stop_gap: float | None = 1e-13) -> dict[str, Run]:
    """`run` for every method from the same start point (steps: one number or one per method;
    settings: keyword arguments per method)."""
    settings = settings or {}
    return {m: run(problem, m, steps[m] if isinstance(steps, dict) else steps, stop_gap=stop_gap, **settings.get(m, {}))
            for m in methods}


def distance_sweep(make_problem: Callable[[float], Problem], distances: Sequence[float], methods: Sequence[str],
                   steps: int | dict[str, int], gap: float = 1e-8) -> dict[str, dict[str, np.ndarray]]:
    """For every start distance and method: the iterations and closure calls to reach f - f* <= gap
    (inf if the run never does), and the runs' status. `make_problem(distance)` builds the problem."""
    out = {m: {"iterations": [], "closure_calls": [], "status": []} for m in methods}
    for distance in distances:
        problem = make_problem(distance)
        for m, r in compare(problem, methods, steps, stop_gap=gap).items():
            out[m]["iterations"].append(r.iterations_to(gap))
            out[m]["closure_calls"].append(r.cost_to(gap))
            out[m]["status"].append(r.status)
    return {m: {k: np.asarray(v) for k, v in d.items()} for m, d in out.items()}


def linear_rate(r: Run, floor: float = 1e-10) -> dict[str, float]:
    """The contraction factors q_k = (f_{k+1} - f*) / (f_k - f*) of a convex run while
    f_k - f* > floor (above the rounding floor): `worst` (max q_k: every step contracts the gap by
    at least this factor), `mean` (geometric mean of q_k), `steps` (how many were counted)."""
    gap = r.gap
    k = np.flatnonzero(gap[:-1] > floor)
    if len(k) == 0:
        return {"worst": math.nan, "mean": math.nan, "steps": 0}
    q = np.maximum(gap[k + 1], 0.0) / gap[k]
    positive = np.maximum(q, 1e-300)
    return {"worst": float(q.max()), "mean": float(np.exp(np.log(positive).mean())), "steps": int(len(k))}
