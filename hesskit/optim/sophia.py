"""Sophia: clipped diagonal-Newton steps with a curvature estimate refreshed every k steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..curvature.trace import gauss_newton_bartlett, sampled_label_loss
from .._checks import check_count
from ._base import ClosureOptimizer, check_betas, check_number, check_seed, split_like, step_seed
from .adahessian import hutchinson_diagonal

__all__ = ["Sophia"]

ESTIMATORS = ("hutchinson", "gnb")
DEFAULT_GAMMA = {"hutchinson": 0.01, "gnb": 0.05}  # the paper's gamma_H and gamma_G (as levanter)


class Sophia(ClosureOptimizer):
    r"""Sophia (Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer
    for Language Model Pre-training", ICLR 2024), Algorithm 3 in the paper's parametrisation:

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        every k steps:   h_t = beta2 h_{t-k} + (1 - beta2) h_hat_t      (else h_t = h_{t-1})
        theta <- theta - lr * weight_decay * theta
        theta <- theta - lr * clip( m_t / max(gamma * h_t, eps), 1 )

    clip(z, 1) truncates each coordinate to [-1, 1], so no coordinate moves more than lr per
    step; where h is tiny or negative the step is lr * sign(m) (momentum sign-SGD).

    Curvature estimators (`estimator`):
      * "hutchinson" (Sophia-H): h_hat = u * (H u) from `hk.diagonal` on the step's own graph
        (`hk.LossHessianOperator`); Gaussian u as the paper and levanter. It can be negative.
      * "gnb" (Sophia-G): Gauss-Newton-Bartlett from `hk.gauss_newton_bartlett`: labels drawn
        from the model's own softmax, h_hat = B * g_hat * g_hat (B = number of predictions), an
        unbiased, non-negative estimate of the Gauss-Newton diagonal. The closure must return
        `(loss, logits)`, the mean cross-entropy and the logits it was computed from
        (shape (..., classes)); the estimate reuses that forward pass (the official training
        script runs a second forward pass on the next batch instead).

    Defaults: lr 6e-4, betas (0.965, 0.99), weight decay 0.1 and k = 10 from the official GPT-2
    small configuration; gamma 0.01 for Sophia-H and 0.05 for Sophia-G (paper, levanter); eps 1e-12,
    a guard against division by zero only (the official code's is 1e-15, levanter's 1e-8: where
    gamma h is that small the step is clipped to lr anyway). bias_correction True and the first
    estimate on step 1: this implementation's (below). distribution "gaussian": the paper's and
    levanter's. seed 0: this implementation's (probes and sampled labels are reproducible).

    lr 6e-4, measured on small problems: with only the required arguments Sophia ends about
    where AdamW at its default lr 1e-3 does, ahead on regression and behind on the digits MLPs
    (final training loss over the initial, median of 3 seeds). Sophia-H / AdamW: a 12-48-3 tanh
    regression MLP, 300 full-batch steps, 0.014 / 0.020; a 10-32-1 MLP on scikit-learn's
    diabetes 0.45 / 0.46. Sophia-H / Sophia-G / AdamW, 5 epochs of minibatches of 64 on the
    digits: a 64-128-64-32-10 MLP 0.42 / 0.41 / 0.23, a 64-64-10 MLP 0.54 / 0.54 / 0.40;
    bench/optimizers.py's digits SmallCNN and char LM 95.8-96.7% / 95.8-96.4% / 96.4-96.7% test
    accuracy and 1.82-1.90 / 1.82-1.89 / 1.88-1.95 bits per character. On every one of these
    short runs the best lr of a 3x grid was 3-9 times the default, and AdamW's 9 times its own:
    small models and short budgets take larger steps than GPT-2 pre-training, for both
    optimizers alike. Raise lr for such problems; the default stays the paper's. (Sophia-G is for
    a softmax cross-entropy only: its labels are drawn from softmax(outputs).)

    Where public implementations disagree:
      * Parametrisation: the official SophiaG code steps lr * sign(m) * min(|m| / (rho * bs * h), 1)
        with h the EMA of g_hat^2: that is this update with gamma = rho and bs * h = h here.
        arXiv v1 and pytorch-optimizer's SophiaH clip to [-p, p] instead of [-1, 1] (lr scales differ).
      * First steps: the official code has h = 0 until the caller's first `update_hessian()`, so
        every step before it is a pure sign step. Here the first estimate is taken on step 1
        (then every `update_every` steps), and with `bias_correction=True` (default) m and h are
        divided by (1 - beta1^t) and (1 - beta2^r), r = number of estimates so far, so the first
        h is the estimate itself rather than 1% of it. `bias_correction=False` is the official rule.
      * Probes for Sophia-H: Gaussian (paper, levanter) vs Rademacher (`distribution`).
      * process_group (torch.distributed, e.g. with a DDP model): the gradient is averaged over
        the processes. Sophia-H averages u * (H u) with the same probe u everywhere. Sophia-G draws
        labels independently on each process, averages g_hat weighted by each process's number
        of predictions and squares the mean: B g_hat * g_hat with B and g_hat of the union of the
        processes' predictions, the global batch's estimate (the official DDP training script
        squares each process's own g_hat instead, with its local B).

    `win_rate` after a step is the fraction of coordinates that were not clipped, |m| < gamma h
    (the official training script's definition; its README suggests tuning gamma so that it
    stays within 0.1-0.5).
    """

    settings = ("estimator", "update_every", "bias_correction", "distribution", "seed")

    def __init__(self, params, lr: float = 6e-4, betas: tuple[float, float] = (0.965, 0.99), gamma: float | None = None,
                 eps: float = 1e-12, weight_decay: float = 0.1, estimator: str = "hutchinson", update_every: int = 10,
                 bias_correction: bool = True, distribution: str = "gaussian", seed: int = 0,
                 process_group: Any = None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
        gamma = DEFAULT_GAMMA[estimator] if gamma is None else gamma
        lr = check_number("lr", lr, open_low=True)
        betas = check_betas("betas", betas)
        gamma = check_number("gamma", gamma, open_low=True)
        eps = check_number("eps", eps, open_low=True)
        weight_decay = check_number("weight_decay", weight_decay)
        update_every = check_count("update_every", update_every)
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution: expected 'rademacher' or 'gaussian', got {distribution!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), gamma=gamma, eps=eps, weight_decay=weight_decay))
        self.estimator = estimator
        self.update_every = update_every
        self.bias_correction = bool(bias_correction)
        self.distribution = distribution
        self.seed = check_seed(seed)
        self.win_rate = float("nan")
        self._use_group(process_group)

    @property
    def needs_outputs(self) -> bool:  # Sophia-G's closure returns (loss, logits)
        return self.estimator == "gnb"

    def _curvature(self, ev, params: list[Tensor], seed: int) -> list[Tensor]:
        """A fresh diagonal estimate h_hat, one tensor per parameter."""
        if self.estimator == "hutchinson":
            return self._average(hutchinson_diagonal(ev.loss, params, ev.grads, 1, self.distribution, seed),
                                 "the Hessian diagonal")
        if self._collective is None:
            return split_like(gauss_newton_bartlett(ev.outputs, params, num_samples=1, seed=seed).value, params)
        return self._distributed_gnb(ev.outputs, params, seed)

    def _distributed_gnb(self, logits: Tensor, params: list[Tensor], seed: int) -> list[Tensor]:
        """Gauss-Newton-Bartlett over the processes: B g_hat^2 for the union of their predictions,
        with labels drawn independently on each (seeded by step and process)."""
        rank = self._collective.rank

        def local() -> tuple[Tensor, int]:
            gen = torch.Generator().manual_seed(step_seed(seed, rank))
            with torch.enable_grad():
                loss = sampled_label_loss(logits, gen)
                grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
            count = logits[..., 0].numel()
            return count * torch.cat([g.reshape(-1) for g in grads]).double(), count

        total, count = self._collective.sum(local, "the Gauss-Newton-Bartlett estimate")
        g_hat = total / count
        return split_like((count * g_hat * g_hat).to(params[0].dtype), params)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Tensor:
        params = self._trainable()
        t = self._global_step() + 1
        refresh = (t - 1) % self.update_every == 0
        with torch.enable_grad():
            ev = self._evaluate(closure, create_graph=refresh and self.estimator == "hutchinson")
            h_hat = self._curvature(ev, params, step_seed(self.seed, t)) if refresh else None
        fresh = {id(p): h for p, h in zip(params, h_hat)} if refresh else {}
        unclipped, total = 0, 0
        for group in self.param_groups:
            live = [p for p in group["params"] if p.requires_grad]
            if not live:
                continue
            for p in live:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["refreshes"] = 0  # a count: an int keeps its type through load_state_dict
                    state["exp_avg"] = torch.zeros_like(p)
                    state["hessian"] = torch.zeros_like(p)
                if refresh:
                    state["hessian"].mul_(group["betas"][1]).add_(fresh[id(p)], alpha=1 - group["betas"][1])
                    state["refreshes"] += 1
            torch._foreach_add_([self.state[p]["step"] for p in live], 1)
            unclipped += self._update(live, group, t, float(self.state[live[0]]["refreshes"]))
            total += sum(p.numel() for p in live)
        self.win_rate = unclipped / max(total, 1)
        return ev.loss.detach()

    def _update(self, params: list[Tensor], group: dict, t: int, refreshes: float) -> int:
        """Decoupled decay, then theta -= lr * clip(m / max(gamma h, eps), 1), for one group's
        parameters at once (`torch._foreach_*` ops apply one operation to a list of tensors, as
        torch.optim's own optimizers do). Returns the count of unclipped coordinates."""
        beta1, beta2 = group["betas"]
        m = [self.state[p]["exp_avg"] for p in params]
        h = [self.state[p]["hessian"] for p in params]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, [p.grad for p in params], alpha=1 - beta1)
        if self.bias_correction:
            m = torch._foreach_div(m, 1 - beta1**t)
            h = torch._foreach_div(h, 1 - beta2**refreshes)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        gamma_h = torch._foreach_mul(h, group["gamma"])
        flat_m, flat_gamma_h = torch.cat([x.reshape(-1) for x in m]), torch.cat([x.reshape(-1) for x in gamma_h])
        unclipped = int((flat_m.abs() < flat_gamma_h).sum())  # the official count: |m| < gamma h
        torch._foreach_clamp_min_(gamma_h, group["eps"])
        ratio = torch._foreach_div(m, gamma_h)
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(params, ratio, alpha=-group["lr"])
        return unclipped
