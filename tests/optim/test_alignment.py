"""hk.optim.hessian_alignment_penalty (Hemati et al., ICCV 2023) against a dense float64 reference:
the head Hessians by torch.autograd.functional.hessian and the DomainBed formula written out, for
the penalty's value and its gradient into the head and the layers below it; the identity
H g = ||g|| grad ||g|| against explicit Hessian-vector products; Hutchinson's estimate against the
exact diagonal with a tolerance from its exact variance; stop-gradient semantics; frozen
parameters, dict inputs and the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesskit as hk
from hesskit.optim.alignment import (CENTERS, DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_NUM_PROBES, METHODS,
                                     hessian_alignment_penalty, hessian_gradient_product, hutchinson_hessian_diagonal)

D_IN, D_FEAT, C = 5, 4, 3


def make_problem(num_domains: int = 3, seed: int = 0, n: int = 24):
    """A tanh body, a linear head (15 parameters) and `num_domains` domains of shifted inputs, float64."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(D_IN, D_FEAT), nn.Tanh()).double()
    head = nn.Linear(D_FEAT, C).double()
    gen = torch.Generator().manual_seed(seed + 1)
    domains = [(torch.randn(n, D_IN, generator=gen, dtype=torch.float64) + 0.7 * e,
                torch.randint(0, C, (n,), generator=gen)) for e in range(num_domains)]
    return body, head, domains


def domain_losses(body, head, domains):
    return [F.cross_entropy(head(body(x)), y) for x, y in domains]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def head_loss_fn(body, x, y):
    """The domain loss as a function of the flat head vector w = (weight, bias), the body's
    parameters closed over (their graph is kept)."""
    feats = body(x)

    def loss(w):
        W, b = w[: C * D_FEAT].view(C, D_FEAT), w[C * D_FEAT:]
        return F.cross_entropy(feats @ W.T + b, y)

    return loss


def reference_penalty(body, w, domains, method, alpha, beta, center="mean_loss", stop_gradient=True):
    """The DomainBed formula written out with explicit head Hessians (create_graph, so the value can
    be differentiated into w and the body)."""
    fns = [head_loss_fn(body, x, y) for x, y in domains]
    H = [torch.autograd.functional.hessian(f, w, create_graph=True) for f in fns]
    g = [torch.autograd.grad(f(w), w, create_graph=True)[0] for f in fns]
    H_bar, g_bar = torch.stack(H).mean(0), torch.stack(g).mean(0)
    if method == "hgp":
        A = [He @ ge for He, ge in zip(H, g)]
        center_value = H_bar @ g_bar if center == "mean_loss" else torch.stack(A).mean(0)
    else:
        A = [He.diagonal() for He in H]
        center_value = H_bar.diagonal() if center == "mean_loss" else torch.stack(A).mean(0)
    sg = (lambda t: t.detach()) if stop_gradient else (lambda t: t)
    terms = [alpha * (a - sg(center_value)).pow(2).sum() + beta * (ge - sg(g_bar)).pow(2).sum() for a, ge in zip(A, g)]
    return torch.stack(terms).mean()


def reference_and_grads(body, head, domains, method, alpha, beta, center="mean_loss", stop_gradient=True):
    w = flat([head.weight, head.bias]).detach().clone().requires_grad_()
    value = reference_penalty(body, w, domains, method, alpha, beta, center, stop_gradient)
    grads = torch.autograd.grad(value, [w, *body.parameters()])
    return value.detach(), flat(grads)


def hesskit_and_grads(body, head, domains, method, alpha, beta, center="mean_loss", **kwargs):
    penalty, record = hessian_alignment_penalty(domain_losses(body, head, domains), head, method, alpha=alpha,
                                                beta=beta, center=center, **kwargs)
    grads = torch.autograd.grad(penalty, [head.weight, head.bias, *body.parameters()])
    return penalty.detach(), flat(grads), record


# --------------------------------------------------------------------------- the identity H g = ||g|| grad ||g||
def test_hessian_gradient_product_equals_explicit_hvp_dense_hessian_and_the_papers_form():
    body, head, domains = make_problem()
    params = list(head.parameters())
    x, y = domains[0]
    g = flat(torch.autograd.grad(F.cross_entropy(head(body(x)), y), params, create_graph=True))
    ours = hessian_gradient_product(g, params)
    hvp = flat(torch.autograd.grad(g, params, grad_outputs=g.detach(), retain_graph=True))  # v = g, fixed
    w = flat(params).detach().clone()
    H = torch.autograd.functional.hessian(head_loss_fn(body, x, y), w)
    norm = g.norm()
    paper = norm * flat(torch.autograd.grad(norm, params, retain_graph=True))  # ||g|| grad ||g||
    assert torch.allclose(ours, hvp, rtol=1e-12, atol=1e-15)
    assert torch.allclose(ours, H @ g.detach(), rtol=1e-10, atol=1e-14)
    assert torch.allclose(ours, paper, rtol=1e-12, atol=1e-15)
    assert ours.requires_grad and not hessian_gradient_product(g, params, create_graph=False).requires_grad


def test_hessian_gradient_product_is_differentiated_through_g_too():
    """d/dtheta of ||H g||^2 needs the dependence through the vector g, which an HVP with
    v = g.detach() drops: compare with the dense reference g^T H^2 g differentiated in w."""
    body, head, domains = make_problem()
    x, y = domains[1]
    params = list(head.parameters())
    g = flat(torch.autograd.grad(F.cross_entropy(head(body(x)), y), params, create_graph=True))
    ours = flat(torch.autograd.grad(hessian_gradient_product(g, params).pow(2).sum(), params, retain_graph=True))
    w = flat(params).detach().clone().requires_grad_()
    f = head_loss_fn(body, x, y)
    H = torch.autograd.functional.hessian(f, w, create_graph=True)
    gw = torch.autograd.grad(f(w), w, create_graph=True)[0]
    reference = torch.autograd.grad((H @ gw).pow(2).sum(), w)[0]
    assert torch.allclose(ours, reference, rtol=1e-9, atol=1e-14)
    detached_v = flat(torch.autograd.grad(g, params, grad_outputs=g.detach(), create_graph=True))
    wrong = flat(torch.autograd.grad(detached_v.pow(2).sum(), params))
    assert (wrong - reference).norm() > 1e-3 * reference.norm()  # the detached vector misses a term


# --------------------------------------------------------------------------- the penalty against the dense reference
@pytest.mark.parametrize("center", CENTERS)
@pytest.mark.parametrize("method", METHODS)
def test_penalty_value_and_gradient_match_the_dense_reference(method, center):
    body, head, domains = make_problem()
    alpha, beta = 0.7, 0.3
    value, grads, record = hesskit_and_grads(body, head, domains, method, alpha, beta, center)
    ref_value, ref_grads = reference_and_grads(body, head, domains, method, alpha, beta, center)
    assert record.method == method and record.center == center and record.num_domains == 3
    if method == "hutchinson":
        assert record.exact and record.num_probes == DEFAULT_NUM_PROBES and record.seed is None  # 300 >= 15
    assert torch.allclose(value, ref_value, rtol=1e-10, atol=0)
    assert torch.allclose(grads, ref_grads, rtol=1e-8, atol=1e-12 * ref_grads.abs().max().item())
    body_grads = grads[15:]
    assert body_grads.abs().max() > 1e-6  # the penalty's gradient reaches the layers below the head
    assert math.isclose(record.value, alpha * record.hessian_term + beta * record.gradient_term, rel_tol=1e-12)
    assert record.hessian_distances.shape == record.gradient_distances.shape == (3,)


def test_defaults_are_the_official_domainbed_hyperparameters():
    assert DEFAULT_ALPHA == {"hgp": 1e-4, "hutchinson": 1e-3} and DEFAULT_BETA == 5e-3 and DEFAULT_NUM_PROBES == 300
    body, head, domains = make_problem()
    for method in METHODS:
        _, record = hessian_alignment_penalty(domain_losses(body, head, domains), head, method)
        assert (record.alpha, record.beta, record.center) == (DEFAULT_ALPHA[method], 5e-3, "mean_loss")
        value, _ = reference_and_grads(body, head, domains, method, DEFAULT_ALPHA[method], 5e-3)
        assert math.isclose(record.value, float(value), rel_tol=1e-10)


def test_the_mean_loss_center_is_not_the_mean_of_the_domains_products():
    """H_bar g_bar (official) differs from mean_e H_e g_e: the two centers give different penalties."""
    body, head, domains = make_problem()
    a, _ = hessian_alignment_penalty(domain_losses(body, head, domains), head, alpha=1.0, beta=0.0)
    b, _ = hessian_alignment_penalty(domain_losses(body, head, domains), head, alpha=1.0, beta=0.0,
                                     center="mean_of_domains")
    assert abs(float(a.detach()) - float(b.detach())) > 1e-3 * float(b.detach())


def test_stop_gradient_semantics():
    """The centres are constants: the gradient equals the reference with detached centres. Where a
    centre is the mean of what it is compared with (g_bar; diag(H_bar) = mean_e diag(H_e); any
    "mean_of_domains" centre) the stop-gradient changes nothing, since sum_e (a_e - mean) = 0; for
    HGP's official centre H_bar g_bar, which is not the mean of the H_e g_e, it does."""
    body, head, domains = make_problem()
    for method in METHODS:
        for center in CENTERS:
            _, grads, _ = hesskit_and_grads(body, head, domains, method, 1.0, 1.0, center)
            _, with_sg = reference_and_grads(body, head, domains, method, 1.0, 1.0, center)
            _, without_sg = reference_and_grads(body, head, domains, method, 1.0, 1.0, center, stop_gradient=False)
            assert torch.allclose(grads, with_sg, rtol=1e-8, atol=1e-12 * with_sg.abs().max().item())
            difference = float((with_sg - without_sg).norm() / with_sg.norm())
            if method == "hgp" and center == "mean_loss":
                assert difference > 1e-3
            else:
                assert difference < 1e-12


def test_gradient_term_alone_is_fishs_gradient_matching_and_identical_domains_give_zero():
    body, head, domains = make_problem(num_domains=2)
    twice = [domains[0], domains[0]]
    penalty, record = hessian_alignment_penalty(domain_losses(body, head, twice), head, alpha=1.0, beta=1.0)
    assert float(penalty.detach()) == 0.0 and record.hessian_term == 0.0 and record.gradient_term == 0.0
    losses = domain_losses(body, head, domains)
    g = [flat(torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)) for loss in losses]
    _, record = hessian_alignment_penalty(losses, head, alpha=0.0, beta=1.0)
    # two domains: each is ||g_1 - g_2|| / 2 from the mean
    assert math.isclose(record.gradient_term, float((g[0] - g[1]).pow(2).sum()) / 4, rel_tol=1e-12)


# --------------------------------------------------------------------------- Hutchinson's estimate
def test_hutchinson_diagonal_is_unbiased_within_its_exact_standard_error():
    """68 head parameters, 40 Rademacher probes: each entry's error against the exact diagonal,
    divided by its exact standard error sqrt(sum_{j != i} H_ij^2 / m), stays within 5."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 16), nn.Tanh()).double()
    head = nn.Linear(16, 4).double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 4, (64,))
    params = list(head.parameters())
    g = flat(torch.autograd.grad(F.cross_entropy(head(body(x)), y), params, create_graph=True))
    m = 40
    estimate, exact = hutchinson_hessian_diagonal(g, params, m, torch.Generator().manual_seed(3))
    assert not exact
    feats = body(x).detach()
    H = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(feats @ w[:64].view(4, 16).T + w[64:], y), flat(params).detach())
    off = (H.pow(2).sum(1) - H.diagonal().pow(2))
    z = (estimate.detach() - H.diagonal()) / (off / m).sqrt()
    assert z.abs().max() < 5
    assert z.abs().max() > 0.05  # a random estimate, not the exact diagonal


def test_hutchinson_batched_products_equal_a_loop_over_the_same_probes():
    body, head, domains = make_problem()
    params = list(head.parameters())
    x, y = domains[2]
    g = flat(torch.autograd.grad(F.cross_entropy(head(body(x)), y), params, create_graph=True))
    estimate, _ = hutchinson_hessian_diagonal(g, params, 7, torch.Generator().manual_seed(11))
    Z = torch.randint(0, 2, (7, 15), generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 2 - 1
    loop = torch.stack([z * flat(torch.autograd.grad(g @ z, params, retain_graph=True)) for z in Z]).mean(0)
    assert torch.allclose(estimate, loop, rtol=1e-12, atol=1e-16)


def test_hutchinson_penalty_with_probes_is_exact_on_a_diagonal_hessian_and_reproducible():
    """Loss sum_i d_i w_i^2 / 2 + <c_e, w>: diagonal Hessian, so z * (H z) = diag(H) for any probe,
    and the penalty with random probes equals the exact formula."""
    w = torch.randn(20, dtype=torch.float64, requires_grad=True)
    d = [torch.rand(20, dtype=torch.float64) + 0.5 for _ in range(3)]
    c = [torch.randn(20, dtype=torch.float64) for _ in range(3)]
    losses = [0.5 * (de * w * w).sum() + (ce * w).sum() for de, ce in zip(d, c)]
    penalty, record = hessian_alignment_penalty(losses, [w], "hutchinson", alpha=1.0, beta=1.0, num_probes=5, seed=4)
    assert not record.exact and record.seed == 4 and record.num_probes == 5
    g = [de * w + ce for de, ce in zip(d, c)]
    d_bar, g_bar = torch.stack(d).mean(0), torch.stack(g).mean(0).detach()
    exact = torch.stack([(de - d_bar).pow(2).sum() + (ge - g_bar).pow(2).sum() for de, ge in zip(d, g)]).mean()
    assert torch.allclose(penalty, exact, rtol=1e-12)
    again, _ = hessian_alignment_penalty(losses, [w], "hutchinson", alpha=1.0, beta=1.0, num_probes=5, seed=4)
    assert torch.equal(penalty, again)
    _, drawn = hessian_alignment_penalty(losses, [w], "hutchinson", num_probes=5)
    assert isinstance(drawn.seed, int)  # a drawn seed is recorded


def test_random_probes_converge_to_the_exact_penalty_as_the_budget_grows():
    """Independent probes per domain bias ||D_e - D_bar||^2 upwards by the estimates' variance; the
    bias shrinks like 1/m. With 14 < 15 probes the estimate differs from the exact value; with the
    unit vectors it is exact."""
    body, head, domains = make_problem()
    exact, _ = hessian_alignment_penalty(domain_losses(body, head, domains), head, "hutchinson", alpha=1.0, beta=0.0)
    few = [float(hessian_alignment_penalty(domain_losses(body, head, domains), head, "hutchinson", alpha=1.0,
                                           beta=0.0, num_probes=2, seed=s)[0].detach()) for s in range(40)]
    many = [float(hessian_alignment_penalty(domain_losses(body, head, domains), head, "hutchinson", alpha=1.0,
                                            beta=0.0, num_probes=14, seed=s)[0].detach()) for s in range(40)]
    assert abs(sum(many) / 40 - float(exact.detach())) < abs(sum(few) / 40 - float(exact.detach()))
    assert sum(few) / 40 > float(exact.detach())  # the variance adds to the expected squared distance


# --------------------------------------------------------------------------- the model left alone, any model
def test_the_model_is_left_alone_and_grad_is_untouched_until_backward():
    body, head, domains = make_problem()
    model = nn.Sequential(body, head).train()
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    penalty, _ = hessian_alignment_penalty(domain_losses(body, head, domains), head, "hgp")
    assert all(p.grad is None for p in model.parameters())
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    penalty.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_frozen_parameters_are_left_out_of_a_module_and_refused_in_a_list():
    body, head, domains = make_problem()
    head.bias.requires_grad_(False)
    losses = domain_losses(body, head, domains)
    penalty, record = hessian_alignment_penalty(losses, head, "hgp", alpha=1.0, beta=1.0)
    assert record.param_names == ("weight",) and record.skipped == ("bias",) and record.num_params == 12
    w = head.weight.detach().clone().requires_grad_()
    feats = [(body(x), y) for x, y in domains]

    def ref(w):
        fns = [lambda v, f=f, y=y: F.cross_entropy(f @ v.view(C, D_FEAT).T + head.bias, y) for f, y in feats]
        H = [torch.autograd.functional.hessian(fn, w.reshape(-1), create_graph=True) for fn in fns]
        g = [torch.autograd.grad(fn(w.reshape(-1)), w, create_graph=True)[0].reshape(-1) for fn in fns]
        Hb, gb = torch.stack(H).mean(0), torch.stack(g).mean(0)
        return torch.stack([((He @ ge - (Hb @ gb).detach()).pow(2).sum() + (ge - gb.detach()).pow(2).sum())
                            for He, ge in zip(H, g)]).mean()

    assert torch.allclose(penalty, ref(w), rtol=1e-10)
    with pytest.raises(ValueError, match=r"head_params\[1\]: does not require grad"):
        hessian_alignment_penalty(domain_losses(body, head, domains), [head.weight, head.bias])
    head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="head_params: the module has no parameter that requires grad"):
        hessian_alignment_penalty(domain_losses(body, head, domains), head)


class DictModel(nn.Module):
    """A model called as model(**inputs), with a named classifier head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D_IN, D_FEAT), nn.Tanh())
        self.classifier = nn.Linear(D_FEAT + 1, C)

    def forward(self, pixels, scale):
        return self.classifier(torch.cat([self.encoder(pixels), scale[:, None]], dim=1))


def test_a_model_with_dict_inputs_works_through_its_losses():
    torch.manual_seed(0)
    model = DictModel().double()
    gen = torch.Generator().manual_seed(0)
    batches = [({"pixels": torch.randn(16, D_IN, generator=gen, dtype=torch.float64) + e,
                 "scale": torch.rand(16, generator=gen, dtype=torch.float64)},
                torch.randint(0, C, (16,), generator=gen)) for e in range(2)]
    losses = [F.cross_entropy(model(**inputs), y) for inputs, y in batches]
    penalty, record = hessian_alignment_penalty(losses, model.classifier, "hutchinson", alpha=1.0, beta=1.0)
    assert record.num_params == C * (D_FEAT + 1) + C and record.exact
    penalty.backward()
    assert model.encoder[0].weight.grad.abs().max() > 0


def test_zero_head_gradient_keeps_the_penalty_gradient_finite():
    """At a domain's minimum g_e = 0, where grad ||g|| (the paper's form) has a nan derivative."""
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    losses = [0.5 * (w * w).sum(), 0.5 * ((w - 1) ** 2).sum() * 2.0]
    penalty, _ = hessian_alignment_penalty(losses, [w], "hgp", alpha=1.0, beta=1.0)
    (grad,) = torch.autograd.grad(penalty, w)
    assert torch.isfinite(grad).all() and torch.isfinite(penalty)


def test_record_counts_the_backward_passes():
    body, head, domains = make_problem()
    _, hgp = hessian_alignment_penalty(domain_losses(body, head, domains), head, "hgp")
    assert hgp.num_backward == 3 * 2 + 1 and hgp.num_probes is None and hgp.seed is None
    _, hutch = hessian_alignment_penalty(domain_losses(body, head, domains), head, "hutchinson", num_probes=4, seed=0)
    assert hutch.num_backward == 3 * (1 + 4) + 4
    for center in CENTERS:  # from the unit vectors, diag(H_bar) is the mean of the diag(H_e): no extra products
        _, exact = hessian_alignment_penalty(domain_losses(body, head, domains), head, "hutchinson", center=center)
        assert exact.exact and exact.num_backward == 3 * (1 + 15)
    _, mean_of = hessian_alignment_penalty(domain_losses(body, head, domains), head, "hgp", center="mean_of_domains")
    assert mean_of.num_backward == 3 * 2
    assert hk.optim.hessian_alignment_penalty is hessian_alignment_penalty


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    body, head, domains = make_problem()
    losses = domain_losses(body, head, domains)
    with pytest.raises(ValueError, match="losses_per_domain: expected the losses of at least 2 domains"):
        hessian_alignment_penalty(losses[:1], head)
    with pytest.raises(ValueError, match=r"losses_per_domain\[1\]: expected a scalar"):
        hessian_alignment_penalty([losses[0], torch.ones(2, requires_grad=True)], head)
    with pytest.raises(ValueError, match=r"losses_per_domain\[0\]: has no graph"):
        hessian_alignment_penalty([losses[0].detach(), losses[1]], head)
    other = nn.Linear(D_FEAT, C).double()
    with pytest.raises(ValueError, match=r"losses_per_domain\[0\]: does not depend on head_params"):
        hessian_alignment_penalty(losses, other)
    with pytest.raises(ValueError, match="method: expected one of"):
        hessian_alignment_penalty(losses, head, "fishr")
    with pytest.raises(ValueError, match="center: expected one of"):
        hessian_alignment_penalty(losses, head, center="median")
    with pytest.raises(ValueError, match="alpha: expected a finite number >= 0"):
        hessian_alignment_penalty(losses, head, alpha=-1.0)
    with pytest.raises(ValueError, match="beta: expected a finite number >= 0"):
        hessian_alignment_penalty(losses, head, beta=float("nan"))
    with pytest.raises(ValueError, match="num_probes: expected an integer >= 1"):
        hessian_alignment_penalty(losses, head, "hutchinson", num_probes=0)
    with pytest.raises(TypeError, match="head_params: expected an nn.Module"):
        hessian_alignment_penalty(losses, 3.0)
    with pytest.raises(TypeError, match=r"head_params\[0\]: expected a tensor"):
        hessian_alignment_penalty(losses, ["weight"])
    with pytest.raises(ValueError, match="grad: expected the flat gradient of length 15"):
        hessian_gradient_product(torch.zeros(3), list(head.parameters()))
