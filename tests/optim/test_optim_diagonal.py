"""AdaHessian and Sophia: first steps by hand, a trajectory against the paper's equations
written here, convergence, estimators on a step's graph, bad input. The contract every optimizer
shares (state_dict, dtypes, the model left alone, param groups, closure errors) is in test_contract.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import hesskit as hk
from hesskit.optim import step_seed

H_DIAG = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)


@pytest.fixture(autouse=True)
def float64_default():
    """Tensors made in these tests are float64; the default is restored for other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def quadratic_closure(opt, x, h):
    def closure():
        opt.zero_grad()
        return 0.5 * (h * x**2).sum()

    return closure


def rademacher(n: int, seed: int) -> torch.Tensor:
    """The probe hk.diagonal draws from `seed` (one column)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, 1), generator=gen, dtype=torch.float64).mul_(2).sub_(1)[:, 0]


def gaussian(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=gen, dtype=torch.float64)[:, 0]


# ------------------------------------------------------------------ AdaHessian
@pytest.mark.parametrize("lr", [0.1, 0.5, 1.0])
def test_adahessian_first_step_on_diagonal_quadratic_is_x_times_one_minus_lr(lr):
    # g = h x and D = |z (H z)| = h exactly, so m_hat / sqrt(v_hat) = x
    x = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = hk.optim.AdaHessian([x], lr=lr, eps=1e-30)
    start = x.detach().clone()
    opt.step(quadratic_closure(opt, x, H_DIAG))
    torch.testing.assert_close(x.detach(), start * (1 - lr), rtol=1e-14, atol=0)


def test_adahessian_first_step_with_hessian_power_and_eps():
    x = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = hk.optim.AdaHessian([x], lr=0.2, eps=1e-3, hessian_power=0.5)
    start = x.detach().clone()
    opt.step(quadratic_closure(opt, x, H_DIAG))
    expected = start - 0.2 * (H_DIAG * start) / (H_DIAG.sqrt() + 1e-3)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-14, atol=0)


def adahessian_reference(params0, hessian, steps, lr, betas, eps, k, wd, seed, kernel_shape):
    """AdaHessian from the paper's equations on f(w) = 1/2 w^T H w, w = concat(vec(W), b),
    with W a Conv1d-like kernel (|z Hz| averaged over its last dimension)."""
    w = params0.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    nW = math.prod(kernel_shape)
    for t in range(1, steps + 1):
        g = hessian @ w
        z = rademacher(len(w), step_seed(seed, t))
        d = (z * (hessian @ z)).abs()
        dW = d[:nW].reshape(kernel_shape)
        d = torch.cat([dW.mean(dim=-1, keepdim=True).expand_as(dW).reshape(-1), d[nW:]])
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * d**2
        denom = (v / (1 - betas[1] ** t)).sqrt() ** k + eps
        w = w - lr * (m / (1 - betas[0] ** t) / denom + wd * w)
    return w


def test_adahessian_trajectory_matches_the_papers_equations():
    torch.manual_seed(0)
    shape = (2, 2, 3)
    n = 12 + 2
    A = torch.randn(n, n)
    H = A @ A.T / n + torch.eye(n)
    W = nn.Parameter(torch.randn(shape))
    b = nn.Parameter(torch.randn(2))
    w0 = torch.cat([W.detach().reshape(-1), b.detach()])
    opt = hk.optim.AdaHessian([W, b], lr=0.05, betas=(0.8, 0.95), eps=1e-3, hessian_power=0.7, weight_decay=0.01, seed=3)

    def closure():
        opt.zero_grad()
        w = torch.cat([W.reshape(-1), b])
        return 0.5 * w @ H @ w

    for _ in range(6):
        opt.step(closure)
    expected = adahessian_reference(w0, H, 6, 0.05, (0.8, 0.95), 1e-3, 0.7, 0.01, 3, shape)
    torch.testing.assert_close(torch.cat([W.detach().reshape(-1), b.detach()]), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 2, 5), (3, 2, 2, 2), (2, 2, 2, 2, 2)])
def test_spatial_average_handles_every_kernel_rank(shape):
    d = torch.rand(shape)
    out = hk.optim.adahessian.spatial_average(d)
    assert out.shape == d.shape
    torch.testing.assert_close(out[0, 0], d[0, 0].mean().expand_as(d[0, 0]))


def test_adahessian_update_every_keeps_the_last_estimate():
    x = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = hk.optim.AdaHessian([x], lr=0.1, update_every=3)
    closure = quadratic_closure(opt, x, H_DIAG)
    for _ in range(4):
        opt.step(closure)
    # the diagonal is exact here (H is diagonal), so the kept estimate is H itself
    torch.testing.assert_close(opt.state[x]["hessian_diag"], H_DIAG)


def test_adahessian_solves_an_ill_conditioned_diagonal_quadratic_where_sgd_cannot():
    h = torch.logspace(0, 4, 20)
    losses = {}
    for name in ("adahessian", "sgd"):
        x = nn.Parameter(torch.ones(20))
        opt = hk.optim.AdaHessian([x], lr=0.5) if name == "adahessian" else torch.optim.SGD([x], lr=1.9 / 1e4)

        def closure():
            opt.zero_grad()
            loss = 0.5 * (h * x**2).sum()
            if name == "sgd":
                loss.backward()
            return loss

        for _ in range(200):
            opt.step(closure)
        losses[name] = closure().item()
    assert losses["adahessian"] < 1e-4
    assert losses["sgd"] > 1.0  # the slow direction (h = 1) has barely moved


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize("make", [
    lambda p: hk.optim.AdaHessian([p], lr=0.15, hessian_power=0.5),
    lambda p: hk.optim.Sophia([p], lr=0.01, weight_decay=0.0, update_every=1),
], ids=["adahessian", "sophia-h"])
def test_rosenbrock_reaches_the_minimum(make):
    x = nn.Parameter(torch.tensor([-1.5, 2.0]))
    opt = make(x)

    def closure():
        opt.zero_grad()
        return rosenbrock(x)

    for _ in range(3000):
        opt.step(closure)
    assert rosenbrock(x).item() < 1e-3
    torch.testing.assert_close(x.detach(), torch.ones(2), atol=0.05, rtol=0)


# ------------------------------------------------------------------ Sophia
def test_sophia_h_first_step_by_hand_is_a_clipped_newton_step_not_a_sign_step():
    x = nn.Parameter(torch.tensor([1e-3, -2.0, 3.0]))
    lr, gamma, wd = 0.1, 0.5, 0.01
    opt = hk.optim.Sophia([x], lr=lr, gamma=gamma, weight_decay=wd, seed=4)
    start = x.detach().clone()
    opt.step(quadratic_closure(opt, x, H_DIAG))
    u = gaussian(3, step_seed(4, 1))
    h_hat = u * (H_DIAG * u)  # the Hutchinson estimate with the same Gaussian probe
    g = H_DIAG * start
    expected = start * (1 - lr * wd) - lr * (g / (gamma * h_hat).clamp(min=1e-12)).clamp(-1, 1)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-14, atol=0)
    ratio = (g / (gamma * h_hat)).abs()
    assert ratio[0] < 1  # the small coordinate takes a Newton step: no sign step before curvature
    assert opt.win_rate == pytest.approx(float((ratio < 1).float().mean()))


def test_sophia_without_bias_correction_is_the_official_rule():
    x = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = hk.optim.Sophia([x], lr=0.1, gamma=1.0, betas=(0.9, 0.99), weight_decay=0.0, bias_correction=False,
                          distribution="rademacher")
    start = x.detach().clone()
    opt.step(quadratic_closure(opt, x, H_DIAG))
    m = 0.1 * H_DIAG * start  # (1 - beta1) g
    h = 0.01 * H_DIAG  # (1 - beta2) h_hat, h_hat = diag(H) exactly with Rademacher probes
    torch.testing.assert_close(x.detach(), start - 0.1 * (m / h).clamp(-1, 1), rtol=1e-14, atol=0)


def sophia_reference(w0, hessian, steps, lr, betas, gamma, eps, wd, k, seed):
    """Sophia-H (paper Algorithm 3, bias-corrected m and h) on f(w) = 1/2 w^T H w."""
    w, m, h, refreshes = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), 0
    for t in range(1, steps + 1):
        g = hessian @ w
        if (t - 1) % k == 0:
            u = gaussian(len(w), step_seed(seed, t))
            h = betas[1] * h + (1 - betas[1]) * u * (hessian @ u)
            refreshes += 1
        m = betas[0] * m + (1 - betas[0]) * g
        m_hat, h_hat = m / (1 - betas[0] ** t), h / (1 - betas[1] ** refreshes)
        w = w * (1 - lr * wd)
        w = w - lr * (m_hat / (gamma * h_hat).clamp(min=eps)).clamp(-1, 1)
    return w


def test_sophia_trajectory_matches_the_papers_equations():
    torch.manual_seed(1)
    n = 8
    A = torch.randn(n, n)
    H = A @ A.T / n + 0.5 * torch.eye(n)
    w = nn.Parameter(torch.randn(n))
    w0 = w.detach().clone()
    opt = hk.optim.Sophia([w], lr=0.05, gamma=0.3, weight_decay=0.05, update_every=3, seed=9)

    def closure():
        opt.zero_grad()
        return 0.5 * w @ H @ w

    for _ in range(10):
        opt.step(closure)
    expected = sophia_reference(w0, H, 10, 0.05, (0.965, 0.99), 0.3, 1e-12, 0.05, 3, 9)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def softmax_regression(seed=0, n=64, d=5, c=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    model = nn.Linear(d, c)
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=gen) * 0.5)
        model.bias.zero_()
    return model, x, y


def test_gauss_newton_bartlett_is_unbiased_for_the_ggn_diagonal():
    model, x, y = softmax_regression()
    params = list(model.parameters())
    exact = hk.GGNOperator(model, nn.CrossEntropyLoss(), (x, y)).dense().diagonal()
    est = hk.gauss_newton_bartlett(model(x), params, num_samples=400, seed=0)
    z = (est.value - exact) / est.stderr
    assert (est.value >= 0).all()
    # 18 coordinates, each a mean of 400 samples: |z| < 4.5 for all holds with probability > 0.9998
    assert z.abs().max() < 4.5
    assert est.num_matvecs == 400


def test_sophia_g_uses_gnb_on_the_closure_outputs():
    model, x, y = softmax_regression(1)
    opt = hk.optim.Sophia(model.parameters(), lr=0.01, estimator="gnb", seed=5)
    start = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    opt.step(closure)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, s in zip(ref.parameters(), start):
            p.copy_(s)
    logits = ref(x)
    params = list(ref.parameters())
    g = torch.autograd.grad(nn.functional.cross_entropy(logits, y), params, retain_graph=True)
    h = hk.gauss_newton_bartlett(logits, params, num_samples=1, seed=step_seed(5, 1)).value
    g = torch.cat([t.reshape(-1) for t in g])
    w0 = torch.cat([s.reshape(-1) for s in start])
    expected = w0 * (1 - 0.01 * 0.1) - 0.01 * (g / (0.05 * h).clamp(min=1e-12)).clamp(-1, 1)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_sophia_g_needs_outputs_from_the_closure():
    model, x, y = softmax_regression()
    opt = hk.optim.Sophia(model.parameters(), estimator="gnb")
    with pytest.raises(ValueError, match=r"closure: Sophia needs closure\(\) to return \(loss, outputs\)"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))


# ------------------------------------------------------------------ operators and input checks
def test_loss_operators_match_the_model_operators():
    torch.manual_seed(0)
    model = hk.models.MLP(in_features=4, hidden=(5,), out_features=3, activation="tanh").double()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    criterion = nn.CrossEntropyLoss()
    params = list(model.parameters())
    logits = model(x)
    loss = criterion(logits, y)
    torch.testing.assert_close(hk.LossHessianOperator(loss, params).dense(), hk.HessianOperator(model, criterion, (x, y)).dense())
    torch.testing.assert_close(hk.LossGGNOperator(loss, logits, params).dense(), hk.GGNOperator(model, criterion, (x, y)).dense())


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(hessian_power=2.0), "hessian_power"),
    (dict(update_every=0), "update_every"), (dict(num_probes=0), "num_probes"), (dict(distribution="x"), "distribution"),
    (dict(seed=-1), "seed"), (dict(lr=float("nan")), "lr"),
])
def test_adahessian_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hk.optim.AdaHessian([nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(estimator="newton"), "estimator"), (dict(gamma=0.0), "gamma"), (dict(update_every=1.5), "update_every"),
    (dict(betas=(0.9, 1.2)), r"betas\[1\]"), (dict(lr=0), "lr"),
])
def test_sophia_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hk.optim.Sophia([nn.Parameter(torch.ones(2))], **kwargs)


def test_a_nan_product_is_a_floating_point_error_for_training_loops():
    # a ValueError for the curvature API, and a FloatingPointError (divergence) for optimizers
    x = nn.Parameter(torch.tensor([1.0, 2.0]))
    loss = (torch.sqrt(x - 1.0) ** 3).sum()  # the second derivative 3 / (4 sqrt(x - 1)) is infinite at x = 1
    op = hk.LossHessianOperator(loss, [x])
    for kind in (ValueError, FloatingPointError):
        with pytest.raises(kind, match="nan or inf"):
            op @ torch.ones(2)
