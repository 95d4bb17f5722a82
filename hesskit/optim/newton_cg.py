"""Newton-CG (Hessian-free optimization): each step solves a damped Newton system by conjugate gradient."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..curvature.operators import LossGGNOperator, LossHessianOperator
from .._checks import check_count
from ._base import ClosureOptimizer, check_number, split_like

__all__ = ["NewtonCG", "conjugate_gradient", "CGResult"]

CURVATURES = ("ggn", "hessian")


@dataclass
class CGResult:
    """What `conjugate_gradient` returns: the solution and how it stopped."""

    x: Tensor
    residual: Tensor  # b - A x (the recursively updated residual)
    iterations: int  # CG steps taken (each costs one product)
    products: int  # products with A, including the warm start's A x0
    converged: bool  # |b - A x| <= tol * |b|
    negative_curvature: bool  # stopped at a direction p with p^T A p <= 0


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, tol: float = 1e-5,
                       max_iters: int = 100) -> CGResult:
    """Solve A x = b for a symmetric A given by `matvec`: the conjugate gradient method
    (Hestenes & Stiefel 1952; Nocedal & Wright, Numerical Optimization, Algorithm 5.2).

    Stops when |r| <= tol * |b| (relative residual), after `max_iters` steps, or at the first
    direction p with p^T A p <= 0, where the quadratic 1/2 x^T A x - b^T x is not bounded below
    along p. There it returns the current iterate, or b itself if no step has been taken from a
    zero start (the truncation of line-search Newton-CG, Nocedal & Wright Algorithm 7.1: with
    b = -g that is the steepest-descent direction). A warm start x0 is dropped (restart from 0)
    when it is no better than zero on that quadratic, i.e. when -1/2 x0^T (b + r0) >= 0.
    """
    x, r, products = torch.zeros_like(b), b.clone(), 0
    if x0 is not None and bool(x0.any()):
        r0 = b - matvec(x0)
        products += 1
        if -0.5 * torch.dot(x0, b + r0) < 0:
            x, r = x0.clone(), r0
    target = tol * torch.linalg.vector_norm(b)
    p, rr = r.clone(), torch.dot(r, r)
    iterations, negative = 0, False
    while iterations < max_iters and rr.sqrt() > target:
        Ap = matvec(p)
        products += 1
        curvature = torch.dot(p, Ap)
        if curvature <= 0:
            negative = True
            if iterations == 0 and not bool(x.any()):
                x = b.clone()
            break
        alpha = rr / curvature
        x.add_(p, alpha=alpha)
        r.sub_(Ap, alpha=alpha)
        rr_next = torch.dot(r, r)
        p = r + (rr_next / rr) * p
        rr = rr_next
        iterations += 1
    return CGResult(x, r, iterations, products, bool(rr.sqrt() <= target), negative)


class NewtonCG(ClosureOptimizer):
    r"""Hessian-free optimization (Martens, "Deep learning via Hessian-free optimization",
    ICML 2010): a truncated Newton method whose curvature is only touched through products.

        g = grad L(theta),  C = GGN (J^T H_out J) or Hessian of L at theta, both on the step's own graph
        solve  (C + damping * I) d = -g  by conjugate gradient (`conjugate_gradient`),
               warm-started at warm_start_decay * d_previous (Martens 2010, Section 4.5)
        theta <- theta + lr * d                      (lr per group, on that group's slice)

    CG stops at relative residual |r| <= cg_tol * |g|, after `max_cg_iters` products, or, at the
    first direction of non-positive curvature (possible with the indefinite Hessian), returns the
    iterate reached so far (-g if that is the start), as line-search Newton-CG does (Nocedal &
    Wright, Algorithm 7.1). With the GGN (positive semi-definite) this only happens at a CG
    breakdown when damping = 0.

    Levenberg-Marquardt damping (`adapt_damping=True`, Martens 2010, Section 4.1): with the
    applied step p = lr * d, the reduction ratio

        rho = (L(theta + p) - L(theta)) / (g^T p + 1/2 p^T C p)

    compares the actual change of the loss with the undamped quadratic model's prediction;
    rho < 1/4 multiplies damping by 3/2, rho > 3/4 multiplies it by 2/3. This costs a second
    closure evaluation (a forward pass, without graph) and one more curvature product per step,
    and the closure must evaluate the same batch both times. A non-finite new loss, or a model
    that predicts no decrease, counts as rho = -inf, and a zero step leaves damping alone.
    Safeguards (`adapt_damping` only): a step that raises the loss or makes it non-finite
    (rho < 0) is undone (the parameters return to theta, the warm start is dropped and the
    damping grows), and the damping never falls below `min_damping`, so a long run of good
    steps cannot drive it to zero and let CG take an unregularised step.

    Curvature products come from `hk.LossGGNOperator(loss, outputs, params)` (closure returns
    `(loss, outputs)`, the loss computed from those outputs) or `hk.LossHessianOperator(loss, params,
    grads)` (closure returns the loss; the step's gradient is taken with `create_graph=True`).
    Each product is one pass backwards through the step's graph (the GGN's is three
    vector-Jacobian products), so no extra forward pass is needed for CG.

    Defaults: lr 1 (a full Newton step; Martens 2010 has no learning rate), curvature "ggn"
    (Martens 2010 and Schraudolph 2002: positive semi-definite, so CG is well-posed), damping 1
    (the initial lambda; LM adapts it), max_cg_iters 100 and warm_start_decay 0.95 (as
    fmeirinhos/pytorch-hessianfree and Martens' 0.95), cg_tol 1e-5 (scipy.sparse.linalg.cg's
    default rtol), adapt_damping True (Martens 2010), min_damping 1e-6 (this implementation's
    safeguard, below).

    Measured with only the required arguments (final training loss over the initial, median of
    3 seeds): 300 full-batch steps on a 12-48-3 tanh regression MLP 1.3e-7 and on a 10-32-1 MLP
    on scikit-learn's diabetes 2e-13 (AdamW at its defaults: 0.020 and 0.46; both fit their
    training set far past the test optimum); 5 epochs of minibatches of 64 on a 64-128-64-32-10
    and a 64-64-10 digits MLP 0.073 and 0.026 (AdamW: 0.23 and 0.40). A full step on a small
    minibatch overfits it: there lr 1/9 reached 0.004 and 0.008 (bench/optimizers.py's digits
    SmallCNN alike), while on full batches lr 1/3 to 1 reached 1e-7 or less and on bench's char LM
    lr 1 was the best of a 3x grid. curvature="hessian" on the same minibatches: the ReLU MLP ended
    at 52-58% test accuracy (against 90-94% with the GGN), its accuracy swinging between 50% and 89%
    as CG met negative curvature and the damping rejected steps; the tanh MLP at 0.080 (GGN 0.026).

    Where public implementations differ:
      * CG stopping: Martens stops on the relative progress of the quadratic
        (phi_i - phi_{i-k}) / phi_i < k * 5e-4, k = max(10, i/10); here the textbook relative
        residual is used. fmeirinhos/pytorch-hessianfree uses Martens' rule plus an absolute
        residual 10 eps.
      * rho's model: here the undamped model g^T p + 1/2 p^T C p; fmeirinhos uses the damped
        model value that CG minimised (with C + damping * I).
      * Step acceptance: fmeirinhos backtracks over CG iterates and runs an Armijo line search
        (more closure calls); here lr is fixed and a step is only undone when it raises the loss.
      * Warm start: Martens always starts CG at warm_start_decay * d_previous; here a warm start
        no better than zero on the new damped model (phi(x0) >= 0) is replaced by zero, which
        costs nothing extra (A x0 is needed for the first residual anyway). On an exact quadratic
        that always happens (the previous residual is orthogonal to d_previous).
      * Preconditioning (Martens' diagonal empirical-Fisher preconditioner) is not offered.

    After each step `opt.last_step_info` holds cg_iterations, num_products (all curvature products
    of the step), converged, negative_curvature, relative_residual, damping (used for this step),
    rho (nan without adapt_damping), rejected (the step was undone) and loss (before the step).
    """

    settings = ("curvature", "damping", "max_cg_iters", "cg_tol", "adapt_damping", "warm_start_decay", "min_damping")

    def __init__(self, params, lr: float = 1.0, curvature: str = "ggn", damping: float = 1.0, max_cg_iters: int = 100,
                 cg_tol: float = 1e-5, adapt_damping: bool = True, warm_start_decay: float = 0.95,
                 min_damping: float = 1e-6):
        lr = check_number("lr", lr, open_low=True)
        if curvature not in CURVATURES:
            raise ValueError(f"curvature: expected one of {CURVATURES}, got {curvature!r}")
        damping = check_number("damping", damping)
        if not isinstance(adapt_damping, bool):
            raise ValueError(f"adapt_damping: expected True or False, got {adapt_damping!r}")
        if adapt_damping and damping == 0:
            raise ValueError("damping: adapt_damping=True scales damping by 3/2 or 2/3, so it needs damping > 0")
        max_cg_iters = check_count("max_cg_iters", max_cg_iters)
        cg_tol = check_number("cg_tol", cg_tol)
        warm_start_decay = check_number("warm_start_decay", warm_start_decay, 0.0, 1.0)
        min_damping = check_number("min_damping", min_damping)
        super().__init__(params, dict(lr=lr))
        if not self._trainable():
            raise ValueError("params: expected at least one parameter that requires grad")
        self.curvature = curvature
        self.damping = float(damping)
        self.max_cg_iters = max_cg_iters
        self.cg_tol = float(cg_tol)
        self.adapt_damping = adapt_damping
        self.warm_start_decay = float(warm_start_decay)
        self.min_damping = float(min_damping)
        self.last_step_info: dict = {}

    @property
    def needs_outputs(self) -> bool:  # the GGN needs the outputs the loss was computed from
        return self.curvature == "ggn"

    def _curvature_operator(self, ev, params: list[Tensor]):
        if self.curvature == "hessian":
            return LossHessianOperator(ev.loss, params, ev.grads)
        try:
            return LossGGNOperator(ev.loss, ev.outputs, params)
        except RuntimeError as exc:  # autograd: the outputs were not used in the graph of the loss
            raise ValueError("closure: for curvature='ggn' return (loss, outputs) with the loss computed from "
                             f"those outputs ({exc})") from exc

    def _loss_value(self, closure: Callable) -> float:
        """The loss after the step, for rho: one more closure call, without a graph."""
        with torch.no_grad():
            out = closure()
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return float(loss)

    def step(self, closure: Callable | None = None) -> Tensor:
        params = self._trainable()
        state = self.state[params[0]]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
        with torch.enable_grad():
            ev = self._evaluate(closure, create_graph=self.curvature == "hessian")
            C = self._curvature_operator(ev, params)
            g = torch.cat([grad.detach().reshape(-1) for grad in ev.grads])
            damping = self.damping
            warm = state.get("cg_solution")
            warm = None if warm is None or warm.shape != g.shape else warm  # groups were added: start afresh
            result = conjugate_gradient(lambda v: C @ v + damping * v, -g,
                                        None if warm is None else self.warm_start_decay * warm,
                                        self.cg_tol, self.max_cg_iters)
            lrs = torch.cat([torch.full((p.numel(),), group["lr"], dtype=g.dtype, device=g.device)
                             for group in self.param_groups for p in group["params"] if p.requires_grad])
            step = lrs * result.x
            predicted = torch.dot(g, step) + 0.5 * torch.dot(step, C @ step) if self.adapt_damping else None
        num_products, loss = C.num_matvecs, ev.loss.detach()
        del C, ev  # release the step's graph before the next forward pass
        with torch.no_grad():
            before = [p.detach().clone() for p in params] if self.adapt_damping else None  # to undo a rejected step
            for p, piece in zip(params, split_like(step, params)):
                p.add_(piece)
        state["step"] += 1
        state["cg_solution"] = result.x
        rho, rejected = math.nan, False
        if self.adapt_damping:
            saved = [p.grad for p in params]
            new_loss = self._loss_value(closure)
            for p, grad in zip(params, saved):
                p.grad = grad
            rho = self._adapt_damping(float(loss), new_loss, float(predicted))
            rejected = rho < 0
            if rejected:  # the step made things worse: undo it exactly and forget it as a warm start
                with torch.no_grad():
                    for p, old in zip(params, before):
                        p.copy_(old)
                del state["cg_solution"]
        residual = torch.linalg.vector_norm(result.residual) / torch.linalg.vector_norm(g).clamp_min(torch.finfo(g.dtype).tiny)
        self.last_step_info = dict(
            cg_iterations=result.iterations, num_products=num_products, converged=result.converged,
            negative_curvature=result.negative_curvature, relative_residual=float(residual),
            damping=damping, rho=rho, rejected=rejected, loss=float(loss),
        )
        return loss

    def _adapt_damping(self, loss: float, new_loss: float, predicted: float) -> float:
        """Levenberg-Marquardt rule of Martens (2010): rho < 1/4 -> damping * 3/2; rho > 3/4 -> damping * 2/3."""
        if predicted == 0:  # no step (g = 0): nothing to learn about the model
            return math.nan
        rho = (new_loss - loss) / predicted if predicted < 0 and math.isfinite(new_loss) else -math.inf
        if rho < 0.25:
            self.damping *= 1.5
        elif rho > 0.75:
            self.damping = max(self.damping * 2 / 3, self.min_damping)
        return rho
