"""The gradient-regularized Newton method with approximate Hessians and an adaptive search on gamma
(Semenov, Jaggi & Doikov, "Gradient-Normalized Smoothness for Optimization with Approximate
Hessians", ICLR 2026, Algorithm 1)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_count
from ..curvature.operators import (LossEmpiricalFisherOperator, LossGGNOperator, LossHessianOperator,
                                   MatrixFreeOperator, NonFiniteError)
from ._base import ClosureOptimizer, check_number, split_like
from .newton_cg import conjugate_gradient

__all__ = ["RegularizedNewton", "regularized_newton_step", "accepts", "GAMMA_MAX"]

CURVATURES = ("hessian", "ggn", "fisher")
SOLVERS = ("auto", "cholesky", "cg")
GAMMA_MAX = 2.0**100  # doubling stops here (about 1.3e30): lambda = ||g|| / gamma is then 0 for any purpose


def regularized_newton_step(H: Tensor, g: Tensor, gamma: float) -> tuple[Tensor | None, float]:
    """One step of Semenov, Jaggi & Doikov (ICLR 2026), Algorithm 1, with a dense curvature H:

        lambda = ||g|| / gamma,    d = -(H + lambda I)^{-1} g      (Cholesky)

    Returns (d, lambda), or (None, lambda) when H + lambda I is not positive definite (an
    indefinite Hessian with lambda below minus its smallest eigenvalue), where the step is undefined."""
    lam = float(torch.linalg.vector_norm(g)) / gamma
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return None, lam
    return -torch.cholesky_solve(g.reshape(-1, 1), L).reshape(-1), lam


def accepts(loss: float, new_loss: float, new_grad_norm: float, lam: float) -> bool:
    """The acceptance test of Algorithm 1 (Semenov, Jaggi & Doikov, ICLR 2026):

        f(x) - f(x + d) >= ||grad f(x + d)||^2 / (8 lambda).

    A non-finite new loss or gradient fails it."""
    if not (math.isfinite(new_loss) and math.isfinite(new_grad_norm)):
        return False
    return loss - new_loss >= new_grad_norm**2 / (8 * lam)


def _place(params: list[Tensor], start: list[Tensor], pieces: list[Tensor] | None = None) -> None:
    """Set the parameters to `start` (+ `pieces`) through `.data`, which leaves autograd's version
    counters alone: the step's graph (which saved the parameters at x) stays usable for the
    curvature products of the next CG solve once the parameters are back at x. The step ends with
    an ordinary in-place write, after the graph is released."""
    with torch.no_grad():
        for i, (p, p0) in enumerate(zip(params, start)):
            p.data.copy_(p0)
            if pieces is not None:
                p.data.add_(pieces[i])


class RegularizedNewton(ClosureOptimizer):
    r"""The gradient-regularized Newton method with an approximate Hessian (Semenov, Jaggi &
    Doikov, "Gradient-Normalized Smoothness for Optimization with Approximate Hessians", ICLR 2026,
    Algorithm 1; official code epfml/grad-norm-smooth, `src/methods.py`, `grad_norm_smooth`):

        g = grad f(x),  H~ = the exact Hessian, the GGN (J^T H_out J) or the empirical Fisher at x
        repeat:  lambda = ||g|| / gamma,   d = -(H~ + lambda I)^{-1} g            (a trial)
                 accept if  f(x) - f(x + d) >= ||grad f(x + d)||^2 / (8 lambda)
                 then  x <- x + d,  gamma <- 2 gamma;   else  gamma <- gamma / 2 and retry

    The regularisation lambda is proportional to the gradient norm, so steps are Newton-like
    near a minimum (superlinear with the exact Hessian) and gradient-like far from it; the search
    on gamma adapts to the unknown smoothness ("gradient-normalized smoothness") and to how well H~
    approximates the Hessian, which gives the paper's global rates, e.g. a global linear rate on
    strongly convex logistic and softmax regression with approximate Hessians. Each trial costs one
    closure call (a forward and backward pass at x + d, on the same batch); H~ is built once per step.

    Whenever H~ is positive semi-definite (the Fisher always, the GGN of a loss convex in the
    outputs such as cross-entropy or MSE, the Hessian of a convex loss), ||d|| <= ||g|| / lambda =
    gamma: gamma is a trust radius that the search doubles after every accepted step and halves
    after every rejected trial.

    A trial where H~ + lambda I is not positive definite (possible with the indefinite Hessian)
    is rejected without a closure call, like a failed test: gamma halves and lambda doubles until
    the system is positive definite. A trial whose loss is nan or inf is rejected too. If no trial
    passes within `max_trials`, or a trial step is so short that x + d rounds to x, the step is
    refused: the parameters are restored exactly, gamma keeps its last value and a RuntimeWarning
    says so. In float32 (or at float64's floor) this happens near a minimum once the decrease of the
    loss is below its rounding: use float64, or stop there. Gamma never doubles past GAMMA_MAX = 2^100
    (this implementation's guard against overflow; lambda is then negligible anyway).

    Curvature products come from the step's own graph: `hk.LossHessianOperator` (closure returns
    the loss; the step's gradient is taken with `create_graph=True`), `hk.LossGGNOperator` or
    `LossEmpiricalFisherOperator` (closure returns `(loss, outputs)`, the loss computed from those
    outputs as the mean of per-row losses). The system is solved by a dense Cholesky
    factorisation of H~ + lambda I (H~ from n products, once per step; every retry reuses it), or by
    conjugate gradient (`hk.optim.newton_cg.conjugate_gradient`; a new solve for every trial,
    stopped at |r| <= cg_tol ||g|| or after `max_cg_iters` products; negative curvature met by CG
    rejects the trial). solver="auto" takes Cholesky when n <= max_cg_iters (then the dense matrix
    costs no more products than one CG solve may) and CG otherwise. Between the trials of a CG step
    the parameters are moved through `.data`, so that the step's graph stays valid for the next
    solve; the step ends with an ordinary in-place write.

    Defaults: curvature "hessian" (the official `grad_norm_smooth`'s default, is_approx=False),
    gamma 1 (official gamma_0 = 1.0), max_trials 40 (official adaptive_search_max_iter = 40),
    lr 1 (the paper's method; lr scales the step per param group and any other value is no longer
    Algorithm 1), solver "auto" (the official code always factorises: cho_factor / cho_solve),
    max_cg_iters 100 and cg_tol 1e-5 (as `hk.optim.NewtonCG`).

    Like `hk.optim.NewtonCG` it takes no `process_group`: its products would need all-reducing.

    Where this differs from the official code:
      * lambda = ||g|| / gamma, as the paper; the official code adds eps = 1e-8 to gamma.
      * After max_trials failed trials the official code takes the last trial step anyway (with an
        optional print); here the step is refused and the parameters stay at x, with a warning. On
        a failed factorisation the official code stops the search and takes the previous trial's
        step; here that trial is rejected and the search goes on with a larger lambda.
      * The official code reuses grad f(x + d) of the accepted trial as the next step's gradient;
        here the next step calls the closure again (one more gradient, as every hesskit optimizer
        builds the curvature on its own closure call, and minibatches may change between steps).
      * The norm is Euclidean (the official code's B = I); its gamma_min floor on the doubling
        (max(2 gamma, 1e-9)) never acts when gamma starts at 1 and is left out.

    After each step `opt.last_step_info` holds loss (f(x)), grad_norm, gamma and lambda (of the last
    trial: the accepted one when accepted), retries (rejected trials), trials, accepted, new_loss
    and new_grad_norm (at the accepted point; nan when refused), required (||grad f(x+d)||^2 /
    (8 lambda)), step_norm (||x_new - x||), gamma_next, num_products (curvature products),
    closure_calls, cg_iterations, solver, and `log`: one dict per trial (gamma, lambda, new_loss,
    new_grad_norm, accepted, reason). The state of each parameter holds its last `update`.
    """

    settings = ("curvature", "gamma", "solver", "max_trials", "max_cg_iters", "cg_tol")

    def __init__(self, params, lr: float = 1.0, curvature: str = "hessian", gamma: float = 1.0, solver: str = "auto",
                 max_trials: int = 40, max_cg_iters: int = 100, cg_tol: float = 1e-5):
        lr = check_number("lr", lr, open_low=True)
        check_choice("curvature", curvature, CURVATURES)
        gamma = check_number("gamma", gamma, open_low=True)
        check_choice("solver", solver, SOLVERS)
        max_trials = check_count("max_trials", max_trials)
        max_cg_iters = check_count("max_cg_iters", max_cg_iters)
        cg_tol = check_number("cg_tol", cg_tol)
        super().__init__(params, dict(lr=lr))
        if not self._trainable():
            raise ValueError("params: expected at least one parameter that requires grad")
        self.curvature = curvature
        self.gamma = float(gamma)
        self.solver = solver
        self.max_trials = max_trials
        self.max_cg_iters = max_cg_iters
        self.cg_tol = float(cg_tol)
        self.last_step_info: dict = {}

    @property
    def needs_outputs(self) -> bool:  # the GGN and the empirical Fisher need the outputs of the loss
        return self.curvature != "hessian"

    def _curvature_operator(self, ev, params: list[Tensor]) -> MatrixFreeOperator:
        if self.curvature == "hessian":
            return LossHessianOperator(ev.loss, params, ev.grads)
        try:
            if self.curvature == "ggn":
                return LossGGNOperator(ev.loss, ev.outputs, params)
            return LossEmpiricalFisherOperator(ev.loss, ev.outputs, params)
        except RuntimeError as exc:  # autograd: the outputs were not used in the graph of the loss
            raise ValueError(f"closure: for curvature={self.curvature!r} return (loss, outputs) with the loss computed "
                             f"from those outputs ({exc})") from exc

    def _trial(self, closure: Callable, params: list[Tensor]) -> tuple[float, float]:
        """f and ||grad f|| at the current parameters (one closure call, first derivatives only);
        (inf, inf) when the loss is not finite."""
        try:
            loss, _ = self._call_closure(closure, create_graph=self.curvature == "hessian")
        except NonFiniteError:
            return math.inf, math.inf
        grads = torch.autograd.grad(loss, params, materialize_grads=True)
        norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
        return float(loss.detach()), norm

    def step(self, closure: Callable | None = None) -> Tensor:
        params = self._trainable()
        first = self.state[params[0]]
        if "step" not in first:
            first["step"] = torch.zeros((), dtype=torch.float64)
        with torch.enable_grad():
            ev = self._evaluate(closure, create_graph=self.curvature == "hessian")
            g = torch.cat([grad.detach().reshape(-1) for grad in ev.grads])
            op = self._curvature_operator(ev, params)
            solver = self.solver if self.solver != "auto" else ("cholesky" if g.numel() <= self.max_cg_iters else "cg")
            H = op.dense() if solver == "cholesky" else None
        loss, grad_norm = ev.loss.detach(), float(torch.linalg.vector_norm(g))
        del ev
        num_products = op.num_matvecs
        if H is not None:
            op = None  # release the step's graph before the trials
        lrs = torch.cat([torch.full((p.numel(),), group["lr"], dtype=g.dtype, device=g.device)
                         for group in self.param_groups for p in group["params"] if p.requires_grad])
        saved_grads = [p.grad for p in params]
        start = [p.detach().clone() for p in params]
        log: list[dict] = []
        accepted, cg_iterations, calls, moved = False, 0, 1, False
        update = torch.zeros_like(g)
        gamma, lam, new_loss, new_norm = self.gamma, 0.0, math.nan, math.nan
        try:
            if grad_norm == 0:  # a stationary point: the step is zero, nothing to test
                accepted, new_loss, new_norm = True, float(loss), 0.0
            for _ in range(self.max_trials if grad_norm > 0 else 0):
                if H is not None:
                    d, lam = regularized_newton_step(H, g, gamma)
                    reason = "H~ + lambda I is not positive definite"
                else:
                    if moved:  # products run on the step's graph, which saved the parameters at x
                        _place(params, start)
                        moved = False
                    lam = grad_norm / gamma
                    with torch.enable_grad():
                        result = conjugate_gradient(lambda v: op @ v + lam * v, -g, tol=self.cg_tol,
                                                    max_iters=self.max_cg_iters)
                    cg_iterations += result.iterations
                    d = None if result.negative_curvature else result.x
                    reason = "CG met negative curvature of H~ + lambda I"
                if d is None:
                    log.append({"gamma": gamma, "lambda": lam, "new_loss": math.nan, "new_grad_norm": math.nan,
                                "accepted": False, "reason": reason})
                    gamma /= 2
                    continue
                step = lrs * d
                _place(params, start, split_like(step, params))
                moved = True
                if all(torch.equal(p, p0) for p, p0 in zip(params, start)):  # x + d rounds to x: nothing to test
                    log.append({"gamma": gamma, "lambda": lam, "new_loss": math.nan, "new_grad_norm": math.nan,
                                "accepted": False, "reason": "x + d rounds to x"})
                    break
                new_loss, new_norm = self._trial(closure, params)
                calls += 1
                ok = accepts(float(loss), new_loss, new_norm, lam)
                log.append({"gamma": gamma, "lambda": lam, "new_loss": new_loss, "new_grad_norm": new_norm,
                            "accepted": ok, "reason": "" if ok else "f(x) - f(x + d) < ||grad f(x + d)||^2 / (8 lambda)"})
                if ok:
                    accepted, update = True, step
                    break
                gamma /= 2
            final = [p.detach().clone() for p in params] if accepted else start
        except BaseException:
            final = start
            raise
        finally:
            if op is not None:
                num_products = op.num_matvecs
            del op  # the graph: the parameters are written below with autograd's usual version tracking
            with torch.no_grad():
                for p, value in zip(params, final):
                    p.copy_(value)
            for p, grad in zip(params, saved_grads):
                p.grad = grad
        self.gamma = min(2 * gamma, GAMMA_MAX) if accepted and grad_norm > 0 else gamma
        first["step"] += 1
        for p, piece in zip(params, split_like(update, params)):
            self.state[p]["update"] = piece.clone()
        if not accepted:
            warnings.warn(f"{type(self).__name__}: no trial step passed the acceptance test in max_trials trials; the "
                          "parameters are unchanged. Near a minimum in float32 the decrease of the loss falls below its "
                          "rounding: use float64, or stop there.", RuntimeWarning, stacklevel=2)
        required = new_norm**2 / (8 * lam) if accepted and lam > 0 else math.nan
        self.last_step_info = {
            "loss": float(loss), "grad_norm": grad_norm, "gamma": gamma, "lambda": lam,
            "retries": len(log) - int(accepted and bool(log)), "trials": len(log), "accepted": accepted,
            "new_loss": new_loss if accepted else math.nan, "new_grad_norm": new_norm if accepted else math.nan,
            "required": required, "step_norm": float(torch.linalg.vector_norm(update)), "gamma_next": self.gamma, "num_products": num_products, "closure_calls": calls,
            "cg_iterations": cg_iterations, "solver": solver, "log": log,
        }
        return loss
