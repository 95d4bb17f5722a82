"""hk.optim.MFAC: steps derived from the equations with dense matrices, convergence, errors. The contract
every optimizer shares (state_dict, dtypes, the model left alone, param groups, closure errors) is in
test_contract.py."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import hesskit as hk


def quadratic(d: int = 6, cond: float = 100.0, seed: int = 0, dtype=torch.float64):
    """A = Q diag(logspace(0, log10 cond)) Q^T, b random: loss(theta) = 1/2 theta^T A theta - b^T theta."""
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    A = (Q * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)) @ Q.T
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    return A.to(dtype), b.to(dtype)


def two_groups(theta0: torch.Tensor):
    """theta split into two parameters, in two groups (lr 0.1 and 0.05)."""
    a = theta0[:4].clone().requires_grad_()
    c = theta0[4:].clone().requires_grad_()
    return a, c


def loss_of(A, b, *parts):
    theta = torch.cat(parts)
    return 0.5 * theta @ A @ theta - b @ theta


def test_first_two_steps_by_hand_two_groups_momentum_weight_decay():
    A, b = quadratic()
    theta0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    a, c = two_groups(theta0)
    m, damping, mu, wd = 4, 1e-2, 0.5, 0.1
    opt = hk.optim.MFAC([dict(params=[a], lr=0.1), dict(params=[c], lr=0.05)], num_grads=m, damping=damping,
                        momentum=mu, weight_decay=wd)

    def closure():
        opt.zero_grad()
        return loss_of(A, b, a, c)

    lrs = torch.tensor([0.1] * 4 + [0.05] * 2, dtype=torch.float64)
    theta, window, v = theta0.clone(), [], torch.zeros(6, dtype=torch.float64)
    for _ in range(2):
        loss_before = 0.5 * theta @ A @ theta - b @ theta  # the closure's loss: no L2 term
        g = A @ theta - b + wd * theta  # coupled L2
        window.append(g)
        G = torch.stack(window)
        F = damping * torch.eye(6, dtype=torch.float64) + G.T @ G / m  # m fixed, missing rows zero
        u = torch.linalg.solve(F, g)
        v = mu * v + (1 - mu) * u
        theta = theta - lrs * v
        loss = opt.step(closure)
        assert torch.allclose(torch.cat([a, c]).detach(), theta, rtol=1e-10, atol=1e-12)
        assert torch.allclose(opt.inverse @ g, u, rtol=1e-8)
        assert loss.item() == pytest.approx(loss_before.item(), rel=1e-12)
    assert isinstance(opt.inverse, hk.MFACInverseOperator) and opt.inverse.count == 2


def test_first_step_float32_and_without_closure():
    A, b = quadratic(dtype=torch.float32)
    theta0 = torch.linspace(-1, 1, 6)
    m, damping, lr = 8, 1e-3, 1e-2
    g = (A.double() @ theta0.double() - b.double())
    u = torch.linalg.solve(damping * torch.eye(6, dtype=torch.float64) + torch.outer(g, g) / m, g)
    expected = theta0.double() - lr * u

    theta = theta0.clone().requires_grad_()
    opt = hk.optim.MFAC([theta], lr=lr, num_grads=m, damping=damping)
    loss_of(A, b, theta).backward()  # the user's own backward, then step() without a closure
    assert opt.step() is None
    assert theta.dtype == torch.float32 and opt.inverse.dtype == torch.float32
    # |g|^2 / (m * damping) is about 6e5 here, yet the step keeps float32 accuracy (up to the
    # rounding of the float32 gradient): F^{-1} g = m G^T K^{-1} e_s subtracts nothing
    step32, step64 = theta.detach().double() - theta0.double(), expected - theta0.double()
    assert g.dot(g) / (m * damping) > 1e5
    assert (step32 - step64).norm() <= 1e-4 * step64.norm()


def test_converges_monotonically_on_an_ill_conditioned_quadratic():
    """F >= damping*I, so |F^{-1}| <= 1/damping and the step is preconditioned gradient descent with
    a positive definite preconditioner P = F^{-1} <= I/damping. For lr <= damping/L (L = largest
    eigenvalue of A) the descent lemma gives
        loss(theta - lr P g) <= loss(theta) - lr g^T P g (1 - L lr / (2 damping)) < loss(theta),
    so the loss decreases monotonically. (With a small damping and deterministic gradients the
    empirical Fisher is not the Hessian: the step grows like m / |g| near the minimum.)"""
    A, b = quadratic(d=8, cond=50.0)
    x_star = torch.linalg.solve(A, b)
    f_star = loss_of(A, b, x_star).item()
    L, damping = 50.0, 1.0
    theta = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = hk.optim.MFAC([theta], lr=1.5 * damping / L, num_grads=8, damping=damping)

    def closure():
        opt.zero_grad()
        return loss_of(A, b, theta)

    gaps = [opt.step(closure).item() - f_star for _ in range(300)]
    assert all(later <= earlier + 1e-14 for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-6 * gaps[0]
    assert (theta.detach() - x_star).norm() < 1e-3 * x_star.norm()


def _save(opt) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return buffer


def test_loading_a_window_of_another_size_is_refused():
    """(The round trip itself is in test_contract.py.)"""
    a, c = two_groups(torch.linspace(-1, 1, 6, dtype=torch.float64))
    opt = hk.optim.MFAC([a, c], num_grads=3)
    opt.step(lambda: loss_of(*quadratic(), a, c))
    bigger = hk.optim.MFAC([a, c], num_grads=5)
    with pytest.raises(ValueError, match="num_grads"):
        bigger.load_state_dict(torch.load(_save(opt)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(num_grads=0), "num_grads"),
        (dict(num_grads=3.0), "num_grads"),
        (dict(damping=0.0), "damping"),
        (dict(damping=float("inf")), "damping"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hk.optim.MFAC([torch.zeros(3, requires_grad=True)], **kwargs)


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="dtype and device"):
        hk.optim.MFAC([torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)])
    theta = torch.zeros(3, requires_grad=True)
    opt = hk.optim.MFAC([theta])
    with pytest.raises(TypeError, match="backward"):
        opt.step()  # no closure and no gradient
    with pytest.raises(ValueError, match="nan"):
        opt.inverse.update(torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(FloatingPointError):
        opt.step(lambda: (theta * float("nan")).sum())
    other = torch.zeros(2, requires_grad=True)
    opt2 = hk.optim.MFAC([theta, other])
    other.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameters changed"):
        opt2.step(lambda: (theta**2).sum())


# --------------------------------------------------------------------------- the official optimizer's semantics
class OfficialMFAC:
    """The official M-FAC optimizer's update (IST-DASLab/M-FAC, `optim.py`), written from its semantics with the
    inverse of its own naive reference (`HInvSlow`: Sherman-Morrison from I / damp, one row after the other):
    a window of m rows starting at zero, filled as a ring buffer; `update_mul` puts g in the oldest row, then
    multiplies g by (damp I + (1/m) sum_rows g_i g_i^T)^{-1}; momentum v = mu v + (1 - mu) u; coupled weight
    decay added to the gradient first. Dense d x d matrices: small models only."""

    def __init__(self, params, lr, ngrads, damp, momentum=0.0, weight_decay=0.0):
        self.params, self.lr, self.m, self.damp, self.mu, self.wd = list(params), lr, ngrads, damp, momentum, weight_decay
        d = sum(p.numel() for p in self.params)
        self.rows, self.last, self.v = torch.zeros(ngrads, d, dtype=torch.float64), 0, torch.zeros(d, dtype=torch.float64)

    def inverse_times(self, x):
        H = torch.eye(self.rows.shape[1], dtype=torch.float64) / self.damp
        for g in self.rows:
            Hg = H @ g
            H -= torch.outer(Hg, Hg) / (self.m + g @ Hg)
        return H @ x

    @torch.no_grad()
    def step(self):
        g = torch.cat([(p.grad + self.wd * p if self.wd > 0 else p.grad).reshape(-1) for p in self.params])
        self.rows[self.last] = g
        u = self.inverse_times(g)
        self.last = (self.last + 1) % self.m
        if self.mu > 0:
            self.v = self.mu * self.v + (1 - self.mu) * u
            u = self.v
        start = 0
        for p in self.params:
            p.add_(u[start : start + p.numel()].view_as(p), alpha=-self.lr)
            start += p.numel()


@pytest.mark.parametrize("settings", [
    dict(lr=1e-3, ngrads=8, damp=1e-5),                                     # the official lr and damping
    dict(lr=1e-3, ngrads=8, damp=1e-3, momentum=0.9, weight_decay=1e-4),
    dict(lr=1e-2, ngrads=16, damp=1e-4),                                    # the window wraps around
    dict(lr=0.03, ngrads=32, damp=0.01),                                    # hesskit's defaults
])
def test_the_update_equals_the_official_optimizers_step_by_step(settings):
    """25 mini-batch steps of an MLP from the same start on the same batches: the parameters after every step
    agree with the official semantics to 1e-12 (relative, float64), whatever the window's fill state."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x, y = torch.randn(256, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (256,), generator=gen)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    criterion = torch.nn.CrossEntropyLoss()
    ours_settings = dict(lr=settings["lr"], num_grads=settings["ngrads"], damping=settings["damp"],
                         momentum=settings.get("momentum", 0.0), weight_decay=settings.get("weight_decay", 0.0))
    trajectories = []
    for make in (lambda ps: OfficialMFAC(ps, **settings), lambda ps: hk.optim.MFAC(ps, **ours_settings)):
        trained = copy.deepcopy(model)
        opt, path = make(trained.parameters()), []
        for t in range(25):
            bx, by = batches[t % len(batches)]
            trained.zero_grad()
            criterion(trained(bx), by).backward()
            opt.step()
            path.append(torch.cat([p.detach().reshape(-1).clone() for p in trained.parameters()]))
        trajectories.append(path)
    moved = (trajectories[0][-1] - torch.cat([p.detach().reshape(-1) for p in model.parameters()])).norm()
    assert moved > 1e-3  # the comparison is not between two parameter vectors that stayed put
    for official, ours in zip(*trajectories):
        assert (official - ours).norm() / official.norm() < 1e-12


# --------------------------------------------------------------------------- the defaults (issue 16)
def test_the_defaults_train_a_full_batch_regression_without_diverging():
    """`MFAC(params)` alone on the held-out 12-48-3 tanh regression (full batch, deterministic gradients: the
    empirical Fisher's worst case). With the official damping 1e-5 (at m = 32) this diverges at every lr from
    1e-3 to 0.1; the default damping keeps every step a descent-sized step. Measured: 0.37 -> 0.008 in 300
    steps (AdamW at its defaults: 0.007)."""
    import heldout

    p = heldout.regression()
    opt = hk.optim.MFAC(p.model.parameters())
    x, y = p.train
    initial, losses = p.loss(), []
    for _ in range(300):
        opt.zero_grad()
        loss = p.criterion(p.model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert max(losses) <= 2 * initial  # no blow-up on the way
    assert p.loss() < 0.1 * initial
    assert p.loss(split="test") < 0.2 * initial  # it fits the teacher, not only the 256 training points


def test_the_defaults_train_a_minibatch_classifier():
    """`MFAC(params)` alone on the held-out digits MLP from scratch: 8 epochs of mini-batches of 64 reach 90%
    test accuracy (measured 95.5%; AdamW at its defaults 90.2%)."""
    import heldout

    p = heldout.untrained_classifier()
    opt = hk.optim.MFAC(p.model.parameters())
    x, y = p.train
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            p.criterion(p.model(x[idx]), y[idx]).backward()
            opt.step()
    assert p.accuracy() > 0.90
