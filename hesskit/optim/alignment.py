"""Hessian alignment for domain generalization: HGP and Hutchinson penalties on a classifier head.

Hemati, Zhang, Estiri & Chen, "Understanding Hessian Alignment for Domain Generalization", ICCV
2023. The paper bounds the transfer measure between two domains by the spectral norm of the
difference of their classifier-head Hessians, and proposes to align, across the training domains
e = 1..E, the head's Hessian and gradient with a penalty added to the mean training loss:

    penalty = (1/E) sum_e  alpha ||A_e - sg(A_bar)||^2  +  beta ||g_e - sg(g_bar)||^2

g_e is the gradient of domain e's loss with respect to the head parameters, g_bar their mean (the
gradient of the mean loss), sg a stop-gradient, and A_e the Hessian information that is aligned:

* "hgp": the Hessian-gradient product A_e = H_e g_e, from the identity H g = ||g|| grad ||g||
  (`hessian_gradient_product`): no Hessian is formed;
* "hutchinson": A_e = diag(H_e), a Hutchinson estimate mean_k z_k * (H_e z_k) over Rademacher
  probes z_k (`hutchinson_hessian_diagonal`).

`hessian_alignment_penalty(losses_per_domain, head_params)` returns the penalty (a tensor with
its graph: add it to your loss in any training loop) and a `HessianAlignmentRecord` of what it
touched. The official code is the DomainBed algorithms `HGP` and `Hutchinson` in
huawei-noah/Federated-Learning, `HessianAlignment/domainbed/algorithms.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_choice, check_count, is_real
from ..curvature.probes import make_generator

__all__ = [
    "METHODS",
    "CENTERS",
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_NUM_PROBES",
    "HessianAlignmentRecord",
    "head_parameters",
    "hessian_gradient_product",
    "hutchinson_hessian_diagonal",
    "hessian_alignment_penalty",
]

METHODS = ("hgp", "hutchinson")
CENTERS = ("mean_loss", "mean_of_domains")
DEFAULT_ALPHA = {"hgp": 1e-4, "hutchinson": 1e-3}  # DomainBed hparams_registry.py of the official code
DEFAULT_BETA = 5e-3  # the same for both methods there
DEFAULT_NUM_PROBES = 300  # the official Hutchinson.update: calc_hessian_diag(..., repeat=300)


@dataclass
class HessianAlignmentRecord:
    """What `hessian_alignment_penalty` computed and touched.

    `value` is the penalty (as a float), `hessian_term` and `gradient_term` its two parts before
    the weights alpha and beta: the means over domains of ||A_e - A_bar||^2 and ||g_e - g_bar||^2,
    whose per-domain values are `hessian_distances` and `gradient_distances`. `param_names` are
    the head parameters differentiated (names when a module was given, else "head_params[i]"),
    `skipped` the frozen parameters of a given module left out, `num_params` their total size.
    `num_backward` counts the backward passes taken (gradients and products); `num_probes` is the
    number of probes per Hutchinson estimate (None for HGP), `exact` says the unit vectors were
    used instead (num_probes >= num_params), `seed` the probes' seed (None for HGP and when exact)."""

    method: str
    alpha: float
    beta: float
    center: str
    value: float
    hessian_term: float
    gradient_term: float
    hessian_distances: np.ndarray
    gradient_distances: np.ndarray
    num_domains: int
    num_params: int
    param_names: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    num_probes: int | None = None
    exact: bool = False
    seed: int | None = None
    num_backward: int = 0
    wall_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- checks
def head_parameters(head_params: Any) -> tuple[list[Tensor], tuple[str, ...], tuple[str, ...]]:
    """The head parameters to differentiate, their names and the frozen ones left out.

    An `nn.Module` contributes its parameters that require grad (a frozen one is named in the
    third item; a module with none left is refused); a tensor or an iterable of tensors must all
    require grad (a frozen one is refused, naming its index). Shared tensors count once."""
    if isinstance(head_params, nn.Module):
        named = list(head_params.named_parameters())
        params = [(n, p) for n, p in named if p.requires_grad]
        skipped = tuple(n for n, p in named if not p.requires_grad)
        if not params:
            raise ValueError("head_params: the module has no parameter that requires grad "
                             f"({len(named)} frozen: {list(skipped)[:5]}); unfreeze the classifier head")
        return [p for _, p in params], tuple(n for n, _ in params), skipped
    tensors = [head_params] if isinstance(head_params, Tensor) else head_params
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"head_params: expected an nn.Module, a tensor or an iterable of tensors, "
                        f"got {type(head_params).__name__}")
    params, names, seen = [], [], set()
    for i, p in enumerate(tensors):
        if not isinstance(p, Tensor):
            raise TypeError(f"head_params[{i}]: expected a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"head_params[{i}]: does not require grad (frozen); pass only the head's trainable "
                             f"parameters, or the head module to leave frozen ones out")
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
            names.append(f"head_params[{i}]")
    if not params:
        raise ValueError("head_params: expected at least one parameter, got none")
    return params, tuple(names), ()


def _check_losses(losses: Any) -> list[Tensor]:
    if isinstance(losses, Tensor):
        losses = list(losses.unbind()) if losses.dim() == 1 else [losses]
    if not isinstance(losses, Sequence):
        raise TypeError(f"losses_per_domain: expected a sequence of scalar losses, one per domain, "
                        f"got {type(losses).__name__}")
    if len(losses) < 2:
        raise ValueError(f"losses_per_domain: expected the losses of at least 2 domains, got {len(losses)} "
                         "(with one domain every distance to the mean is 0 and so is the penalty)")
    for e, loss in enumerate(losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(f"losses_per_domain[{e}]: expected a scalar floating-point loss tensor, got "
                             f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"losses_per_domain[{e}]: has no graph (does not require grad); compute it from the "
                             "model's outputs without torch.no_grad()")
    return [loss.reshape(()) for loss in losses]


def _check_weight(name: str, value: Any) -> float:
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- the two Hessian readings
def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _domain_gradient(loss: Tensor, params: list[Tensor], index: int) -> Tensor:
    """The flat gradient of one domain's loss with respect to the head, with its graph."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError(f"losses_per_domain[{index}]: does not depend on head_params (no path from the loss "
                         "to any head parameter); pass the classifier head that produces this loss's logits")
    return _flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


def hessian_gradient_product(grad: Tensor, params: Sequence[Tensor], create_graph: bool = True) -> Tensor:
    """H g for the flat gradient `grad` = g of a loss with respect to `params` (taken with
    create_graph=True), without forming H: Hemati et al. 2023's identity

        H g = ||g|| grad_theta ||g||,

    computed in its equivalent form grad_theta (||g||^2 / 2) = (dg/dtheta)^T g = H g. The two are
    the same vector (tested to rounding); this one has no singular point where g = 0, at which
    grad ||g|| is undefined (the official code adds 1e-16 to g there; the derivative of the
    paper's form is nan at g = 0). Unlike a Hessian-vector product with a fixed v = g.detach(),
    the result keeps its dependence on theta through both H and g, which is what the penalty's
    own gradient needs. With create_graph=False the result is detached (a value only)."""
    params = list(params)
    if not isinstance(grad, Tensor) or grad.dim() != 1 or grad.numel() != sum(p.numel() for p in params):
        raise ValueError(f"grad: expected the flat gradient of length {sum(p.numel() for p in params)} "
                         f"(the number of entries of params), got {getattr(grad, 'shape', type(grad).__name__)}")
    if not grad.requires_grad:  # the loss is linear in params: H = 0
        return torch.zeros_like(grad)
    half_norm2 = 0.5 * grad.dot(grad)
    out = torch.autograd.grad(half_norm2, params, create_graph=create_graph, retain_graph=True, allow_unused=True)
    out = _flat([torch.zeros_like(p) if o is None else o for o, p in zip(out, params)])
    return out if create_graph else out.detach()


def hutchinson_hessian_diagonal(grad: Tensor, params: Sequence[Tensor], num_probes: int = DEFAULT_NUM_PROBES,
                                generator: torch.Generator | None = None,
                                create_graph: bool = True) -> tuple[Tensor, bool]:
    """diag(H) from the flat gradient `grad` of a loss with respect to `params` (taken with
    create_graph=True): Hutchinson's estimate (Bekas et al. 2007) mean_k z_k * (H z_k) over
    `num_probes` Rademacher probes z_k drawn from `generator` (None: one seeded 0; drawn on the CPU
    in float64, then moved),
    all products in one batched backward pass. With num_probes >= n (the number of entries) the n
    unit vectors give the exact diagonal for fewer products, as `hk.diagonal` does. Returns
    (diagonal, exact). With create_graph the estimate keeps its graph to theta (the Hutchinson
    penalty differentiates it)."""
    params = list(params)
    n = sum(p.numel() for p in params)
    if not isinstance(grad, Tensor) or grad.dim() != 1 or grad.numel() != n:
        raise ValueError(f"grad: expected the flat gradient of length {n} (the number of entries of params), "
                         f"got {getattr(grad, 'shape', type(grad).__name__)}")
    check_count("num_probes", num_probes)
    exact = num_probes >= n
    if not grad.requires_grad:
        return torch.zeros_like(grad), exact
    if exact:
        Z = torch.eye(n, dtype=grad.dtype, device=grad.device)
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        Z = torch.randint(0, 2, (num_probes, n), generator=gen, dtype=torch.float64).mul_(2).sub_(1)
        Z = Z.to(dtype=grad.dtype, device=grad.device)
    HZ = torch.autograd.grad(grad, params, grad_outputs=Z, is_grads_batched=True, create_graph=create_graph,
                             retain_graph=True, allow_unused=True)
    HZ = torch.cat([torch.zeros(len(Z), p.numel(), dtype=Z.dtype, device=Z.device) if h is None
                    else h.reshape(len(Z), -1) for h, p in zip(HZ, params)], dim=1)
    diag = HZ.diagonal() if exact else (Z * HZ).mean(0)
    return (diag if create_graph else diag.detach()), exact


# --------------------------------------------------------------------------- the penalty
def hessian_alignment_penalty(losses_per_domain: Sequence[Tensor], head_params: Any, method: str = "hgp", *,
                              alpha: float | None = None, beta: float = DEFAULT_BETA,
                              num_probes: int = DEFAULT_NUM_PROBES, seed: int | None = None,
                              center: str = "mean_loss") -> tuple[Tensor, HessianAlignmentRecord]:
    r"""The Hessian-alignment penalty of Hemati et al. (ICCV 2023) on a classifier head:

        penalty = (1/E) sum_e  alpha ||A_e - sg(A_bar)||^2 + beta ||g_e - sg(g_bar)||^2

    over the E >= 2 training domains' mean losses `losses_per_domain` (each with its graph), g_e the
    gradient of domain e's loss with respect to `head_params` (the classifier head: an nn.Module,
    whose frozen parameters are left out, or trainable tensors), g_bar = (1/E) sum_e g_e, and

    * method "hgp": A_e = H_e g_e by `hessian_gradient_product` (one extra backward pass per domain);
    * method "hutchinson": A_e = diag(H_e) by `hutchinson_hessian_diagonal` (`num_probes` Rademacher
      probes per domain, drawn from a generator seeded by `seed`; None draws a seed and records it;
      exact from the unit vectors when num_probes >= the head's size).

    The centre A_bar is, with `center="mean_loss"` (the official code), the same quantity for the
    mean loss (1/E) sum_e L_e: H_bar g_bar for HGP (which is not the mean of the H_e g_e), or the
    Hutchinson diagonal of H_bar from its own probes (from the unit vectors it is the mean of the
    exact diag(H_e), taken as that); with "mean_of_domains", the mean of the A_e (no extra
    products). sg is a stop-gradient: the centres are constants, and the penalty's gradient flows
    through the A_e and g_e only, into the head and everything below it. Where a centre is the
    mean of what it is compared with (g_bar; the exact diag(H_bar); any "mean_of_domains" centre)
    the stop-gradient changes no gradient, since the distances' derivative in the centre,
    -2 sum_e (a_e - mean), is 0; it matters for HGP's H_bar g_bar, and for a Hutchinson centre
    estimated from its own probes.

    Returns (penalty, record): the penalty is a scalar tensor to add to the training loss (the
    official code minimises mean_e L_e + penalty), and `HessianAlignmentRecord` holds its two terms,
    per-domain distances and what was differentiated. Nothing of the model is changed: gradients
    are taken with torch.autograd.grad, so `.grad` is untouched until you call backward.

    Defaults, the official DomainBed hyperparameters (`hparams_registry.py`): alpha 1e-4 for HGP
    and 1e-3 for Hutchinson (`DEFAULT_ALPHA`), beta 5e-3 for both; num_probes 300 (the official
    `Hutchinson.update`); center "mean_loss". The official ColoredMNIST scripts instead weight both
    terms 1 and multiply the penalty by 91257.19 after 190 steps of weight 1 (the IRM protocol,
    the whole loss divided by that weight; they also sum the two domains' terms instead of
    averaging them): `hesskit.experiments.hessian_alignment` follows that form.

    Differences from the official code: the norm of g_e is not shifted by 1e-16
    (`hessian_gradient_product` needs no guard); probes come from a seeded private generator, not
    the global one; with num_probes >= n the unit vectors replace the probes.
    """
    start = time.perf_counter()
    check_choice("method", method, METHODS)
    check_choice("center", center, CENTERS)
    alpha = _check_weight("alpha", DEFAULT_ALPHA[method] if alpha is None else alpha)
    beta = _check_weight("beta", beta)
    losses = _check_losses(losses_per_domain)
    params, names, skipped = head_parameters(head_params)
    check_count("num_probes", num_probes)
    num_params = sum(p.numel() for p in params)
    exact = method == "hutchinson" and num_probes >= num_params
    used_seed, gen = make_generator(seed) if method == "hutchinson" else (None, None)
    used_seed = None if exact else used_seed  # the unit vectors draw nothing
    grads = [_domain_gradient(loss, params, e) for e, loss in enumerate(losses)]
    g_bar = torch.stack(grads).mean(0)
    per_reading = 1 if method == "hgp" else min(num_probes, num_params)  # backward passes per A_e
    if method == "hgp":
        readings = [hessian_gradient_product(g, params) for g in grads]
    else:
        readings = [hutchinson_hessian_diagonal(g, params, num_probes, gen)[0] for g in grads]
    backward = len(losses) * (1 + per_reading)
    if center == "mean_of_domains" or exact:  # exact: diag(H_bar) is the mean of the diag(H_e)
        a_bar = torch.stack(readings).mean(0).detach()
    elif method == "hgp":
        a_bar = hessian_gradient_product(g_bar, params, create_graph=False)
        backward += 1
    else:
        a_bar = hutchinson_hessian_diagonal(g_bar, params, num_probes, gen, create_graph=False)[0]
        backward += num_probes
    g_center = g_bar.detach()
    h_dist = torch.stack([(a - a_bar).pow(2).sum() for a in readings])
    g_dist = torch.stack([(g - g_center).pow(2).sum() for g in grads])
    penalty = (alpha * h_dist + beta * g_dist).mean()
    record = HessianAlignmentRecord(
        method=method, alpha=alpha, beta=beta, center=center, value=float(penalty.detach()),
        hessian_term=float(h_dist.detach().mean()), gradient_term=float(g_dist.detach().mean()),
        hessian_distances=h_dist.detach().cpu().double().numpy(),
        gradient_distances=g_dist.detach().cpu().double().numpy(),
        num_domains=len(losses), num_params=num_params, param_names=names, skipped=skipped,
        num_probes=num_probes if method == "hutchinson" else None, exact=exact, seed=used_seed,
        num_backward=backward, wall_time=time.perf_counter() - start)
    return penalty, record
