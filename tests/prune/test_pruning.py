# hk.prune against closed forms: the OBS update with a dense damped empirical Fisher (float64, one
# weight and a block-diagonal set), the sequential OBS against refitting a least-squares problem,
# OBD against an exact Hessian diagonal, magnitude against sorting; exact sparsity counts, models
# never mutated, clear errors, and gradual pruning that keeps pruned weights at zero.

import math

import pytest
import torch
from torch import nn

from conftest import fit
import hesskit as hk
from hesskit import prune
from hesskit.prune.pruning import default_recomputations, sparsity_schedule


def small_mlp(seed=0, hidden=5, dtype=torch.float64):
    torch.manual_seed(seed)
    return hk.models.MLP(4, (hidden,), 3, activation="tanh").to(dtype)


@pytest.fixture(scope="module")
def problem():
    """A float64 4-5-3 MLP (35 weights in two layers) trained a little, and 40 samples."""
    x, y = hk.data.classification(n=40, dim=4, num_classes=3, seed=1)
    x = x.double()
    model = fit(small_mlp(), x, y)
    return model, nn.CrossEntropyLoss(), (x, y)


def weights(model):
    return torch.cat([m.weight.detach().reshape(-1) for m in prune.prunable_layers(model).values()])


def reference_gradients(model, criterion, data):
    """Per-sample gradients of the Linear weights by a plain loop over samples (no vmap)."""
    x, y = data
    params = [m.weight for m in prune.prunable_layers(model).values()]
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(criterion(model(x[i:i + 1]), y[i:i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def damped_fisher(G, damping):
    return damping * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / len(G)


# --------------------------------------------------------------------------- curvature pieces
def test_per_sample_gradients_match_a_loop_and_subsets(problem):
    model, criterion, data = problem
    G = prune.per_sample_gradients(model, criterion, data)
    torch.testing.assert_close(G, reference_gradients(model, criterion, data), rtol=1e-10, atol=1e-12)
    first = prune.per_sample_gradients(model, criterion, data, num_grads=7)
    torch.testing.assert_close(first, G[:7])
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:7]
    torch.testing.assert_close(prune.per_sample_gradients(model, criterion, data, num_grads=7, seed=3), G[idx])
    batches = [(data[0][:25], data[1][:25]), (data[0][25:], data[1][25:])]  # computed all, then drawn
    torch.testing.assert_close(prune.per_sample_gradients(model, criterion, batches, num_grads=7, seed=3), G[idx])
    only_last = prune.per_sample_gradients(model, criterion, data, layers=["3"])
    torch.testing.assert_close(only_last, G[:, 20:])


@pytest.mark.parametrize("m, block_size", [(20, 6), (20, 16), (20, 32), (20, None), (60, None)])
def test_fisher_inverse_is_the_block_diagonal_inverse(m, block_size):
    gen = torch.Generator().manual_seed(0)
    n, damping = 50, 1e-3
    G = torch.randn(m, n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 2, n, dtype=torch.float64)
    inv = prune.FisherInverse(G, damping=damping, block_size=block_size)
    c = n if block_size is None else block_size
    assert inv.method == ("dense" if c <= m else "woodbury") and inv.num_blocks == math.ceil(n / c)
    expected = torch.zeros(n, n, dtype=torch.float64)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    for start in range(0, n, c):
        block = slice(start, min(start + c, n))
        expected[block, block] = torch.linalg.inv(damped_fisher(G[:, block], damping))
        # hesskit's M-FAC operator on the same block, filled gradient by gradient
        mfac = hk.MFACInverseOperator(block.stop - block.start, num_grads=m, damping=damping, dtype=torch.float64)
        for g in G[:, block]:
            mfac.update(g)
        torch.testing.assert_close(inv.diagonal()[block], mfac.inverse_diagonal(), rtol=1e-9, atol=0)
        torch.testing.assert_close((inv @ x)[block], mfac @ x[block], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inv.dense(), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inv.diagonal(), expected.diagonal(), rtol=1e-9, atol=0)
    torch.testing.assert_close(inv @ x[:, 0], expected @ x[:, 0], rtol=1e-9, atol=1e-9)
    # an operator like any other: the Woodbury blocks are hesskit's M-FAC inverses of the blocks' gradients
    assert isinstance(inv, hk.MatrixFreeOperator) and inv.shape == (n, n) and inv.dtype == torch.float64
    assert len(inv.blocks) == (inv.num_blocks if inv.method == "woodbury" else 0)
    assert all(isinstance(b, hk.MFACInverseOperator) and b.num_grads == m for b in inv.blocks)
    before = inv.num_matvecs
    estimate = hk.trace(inv, 30, method="hutchinson", seed=0)  # hesskit's estimators take it as it is
    assert inv.num_matvecs == before + 30 and abs(estimate.value - float(expected.trace())) < 4 * estimate.stderr


# --------------------------------------------------------------------------- OBS closed forms
def test_obs_one_weight_is_the_closed_form(problem):
    """One dropped weight: w - (w_q / [F^-1]_qq) F^-1 e_q with the dense damped EF of all samples."""
    model, criterion, data = problem
    damping = 1e-3
    w = weights(model)
    n = len(w)
    Finv = torch.linalg.inv(damped_fisher(reference_gradients(model, criterion, data), damping))
    q = int(torch.argmin(w**2 / (2 * Finv.diagonal())))
    expected = w - (w[q] / Finv[q, q]) * Finv[:, q]
    pruned = prune.obs(model, criterion, data, 1 / n, damping=damping, block_size=None)
    got = weights(pruned)
    assert got[q] == 0 and int((got == 0).sum()) == 1
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert abs(expected[q]) < 1e-12  # the exact update zeroes w_q by itself
    # biases are not pruned and not updated
    for (name, a), b in zip(model.named_parameters(), pruned.parameters()):
        if name.endswith("bias"):
            assert torch.equal(a, b)
    # the dense sequential OBS with the same matrix takes the same first step
    same = prune.obs_dense(model, damped_fisher(reference_gradients(model, criterion, data), damping), 1 / n, damping=0)
    torch.testing.assert_close(weights(same), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_obs_blocked_update_is_the_block_diagonal_formula(problem, scope):
    """Many drops: w + blockdiag(F_b^-1) u, u_q = -w_q / [F^-1]_qq on the dropped q, then zero them."""
    model, criterion, data = problem
    damping, block, s = 1e-4, 8, 0.4
    w = weights(model)
    n = len(w)
    G = reference_gradients(model, criterion, data)
    Finv = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, n, block):  # blocks of 8 consecutive weights; they straddle the two layers
        b = slice(start, min(start + block, n))
        Finv[b, b] = torch.linalg.inv(damped_fisher(G[:, b], damping))
    rho = w**2 / (2 * Finv.diagonal())
    if scope == "global":
        drop = torch.argsort(rho)[: round(s * n)]
    else:
        drop = torch.cat([torch.argsort(rho[:20])[: round(s * 20)], 20 + torch.argsort(rho[20:])[: round(s * 15)]])
    u = torch.zeros(n, dtype=torch.float64)
    u[drop] = -w[drop] / Finv.diagonal()[drop]
    expected = w + Finv @ u
    expected[drop] = 0
    pruned = prune.obs(model, criterion, data, s, damping=damping, block_size=block, scope=scope, num_recomputations=1)
    torch.testing.assert_close(weights(pruned), expected, rtol=1e-9, atol=1e-12)
    # the same step through a hand-made inverse
    again = prune.obs_with_inverse(model, prune.FisherInverse(G, damping, block), s, scope=scope)
    torch.testing.assert_close(weights(again), expected, rtol=1e-9, atol=1e-12)


def test_obs_dense_is_refitting_least_squares():
    """On a quadratic loss, sequential OBS with the exact Hessian = re-solving with the kept weights."""
    gen = torch.Generator().manual_seed(0)
    N, d = 60, 12
    X = torch.randn(N, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(d, 1, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(N, 1, generator=gen,
                                                                                      dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    criterion = nn.MSELoss()
    H = hk.HessianOperator(model, criterion, (X, y)).dense()
    torch.testing.assert_close(H, 2 * X.T @ X / N)
    loss = lambda m: criterion(m(X), y).item()  # noqa: E731
    for k in range(1, d):
        pruned = prune.obs_dense(model, H, k / d, damping=0)  # the exact Hessian, undamped
        w = pruned.weight.detach()[0]
        keep = w != 0
        assert int((~keep).sum()) == k
        refit = torch.linalg.lstsq(X[:, keep], y).solution[:, 0]
        torch.testing.assert_close(w[keep], refit, rtol=1e-8, atol=1e-10)
    # one removal raises the loss by exactly the saliency w_q^2 / (2 [H^-1]_qq)
    w = model.weight.detach()[0]
    Hinv = torch.linalg.inv(H)
    rho = w**2 / (2 * Hinv.diagonal())
    assert loss(prune.obs_dense(model, H, 1 / d, damping=0)) - loss(model) == pytest.approx(rho.min().item(), rel=1e-8)


# --------------------------------------------------------------------------- OBD and magnitude
def test_obd_ranks_by_the_exact_hessian_diagonal(problem):
    model, criterion, data = problem
    w = weights(model)
    params = [m.weight for m in prune.prunable_layers(model).values()]
    H = hk.HessianOperator(model, criterion, data, params=params).dense()
    s = 0.3
    drop = torch.argsort(0.5 * H.diagonal() * w**2)[: round(s * len(w))]
    expected = w.clone()
    expected[drop] = 0
    for curvature in (H, H.diagonal()):
        assert torch.equal(weights(prune.obd(model, criterion, data, s, curvature=curvature)), expected)
    EF = hk.EmpiricalFisherOperator(model, criterion, data, params=params).dense()
    assert torch.equal(weights(prune.obd(model, criterion, data, s, curvature="empirical_fisher")),
                       weights(prune.obd(model, criterion, data, s, curvature=EF.diagonal())))
    a = prune.obd(model, criterion, data, s, curvature="hessian", num_matvecs=20, seed=4)
    b = prune.obd(model, criterion, data, s, curvature="hessian", num_matvecs=20, seed=4)
    assert torch.equal(weights(a), weights(b))  # Hutchinson estimates are seeded
    G = hk.GGNOperator(model, criterion, data, params=params).dense()
    assert torch.equal(weights(prune.obd(model, criterion, data, s)),  # default: the exact Gauss-Newton diagonal
                       weights(prune.obd(model, criterion, data, s, curvature=G.diagonal())))


def test_magnitude_drops_the_smallest_weights(problem):
    model, _, _ = problem
    w = weights(model)
    for s in (0.1, 0.5, 0.9):
        got = weights(prune.magnitude(model, s))
        k = round(s * len(w))
        assert torch.equal(got == 0, w.abs() <= w.abs().sort().values[k - 1])
        assert torch.equal(got[got != 0], w[got != 0])
    layered = weights(prune.magnitude(model, 0.5, scope="layer"))
    for block in (slice(0, 20), slice(20, 35)):
        part, original = layered[block], w[block]
        k = round(0.5 * len(original))
        assert int((part == 0).sum()) == k
        assert original[part == 0].abs().max() <= original[part != 0].abs().min()


# --------------------------------------------------------------------------- counts and zeros
def with_zeros(model, count=6):
    """A copy with `count` weights of the first layer already zero (large ones, not the smallest)."""
    model = prune.magnitude(model, 0)  # a copy
    with torch.no_grad():
        first = model[1].weight.view(-1)
        first[first.abs().argsort(descending=True)[:count]] = 0
    return model


@pytest.mark.parametrize("method", ["magnitude", "obd", "obs", "obs3"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_sparsity_counts_and_zeros_stay_zero(problem, method, scope):
    model, criterion, data = problem
    start = with_zeros(model)
    zero_before = weights(start) == 0
    for s in (0.0, 0.1, 0.45, 0.8):
        if method == "magnitude":
            pruned = prune.magnitude(start, s, scope=scope)
        elif method == "obd":
            pruned = prune.obd(start, criterion, data, s, scope=scope, curvature="empirical_fisher")
        else:
            pruned = prune.obs(start, criterion, data, s, scope=scope, block_size=8, damping=1e-4,
                               num_recomputations=3 if method == "obs3" else 1)
        w = weights(pruned)
        report = prune.sparsity(pruned)
        if scope == "global":
            assert int((w == 0).sum()) == max(round(s * 35), 6)
            assert report.overall == max(round(s * 35), 6) / 35
        else:
            assert report.zeros == {"1": max(round(s * 20), 6), "3": round(s * 15)}
        assert (w[zero_before] == 0).all()  # already-zero weights count as pruned and stay zero
        assert report.sizes == {"1": 20, "3": 15}


def test_recomputation_schedule_and_conv_layers():
    assert sparsity_schedule(0, 1000, 0.875, 3) == [500, 750, 875]  # density halves each step (M-FAC nrecomps)
    assert sparsity_schedule(100, 1000, 0.05, 4) == [100] * 4  # already sparser than the target: nothing to do
    assert sparsity_schedule(0, 10, 0.5, 1) == [5]
    # obs's default number of steps: 16 per halving of the density (M-FAC's README), from the sparsity reached
    assert [default_recomputations([0], [1000], s) for s in (0.5, 0.7, 0.9, 0.95)] == [16, 28, 54, 70]
    assert default_recomputations([500], [1000], 0.75) == 16  # zeros already there count
    assert default_recomputations([900], [1000], 0.5) == 1  # already sparser: one (empty) step
    assert default_recomputations([0, 300], [1000, 1000], 0.65) == default_recomputations([0], [1000], 0.65)
    torch.manual_seed(0)
    cnn = hk.models.SmallCNN((2, 3)).double()
    (x, y), _ = hk.data.digits(seed=0)
    data = (x[:16].double(), y[:16])
    assert list(prune.prunable_layers(cnn)) == ["0", "3", "7"]
    pruned = prune.obs(cnn, nn.CrossEntropyLoss(), data, 0.6, block_size=16, num_recomputations=2)
    n = sum(m.weight.numel() for m in prune.prunable_layers(cnn).values())
    assert prune.sparsity(pruned).overall == round(0.6 * n) / n
    assert set(prune.sparsity(pruned, layers=["3"]).layers) == {"3"}


# --------------------------------------------------------------------------- the model is never touched
def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [p.requires_grad for p in model.parameters()])


def test_the_model_is_never_mutated(problem):
    model, criterion, data = problem
    model = prune.magnitude(model, 0)  # a private copy to dirty
    model.train()
    model[3].weight.requires_grad_(False)  # a frozen layer is still pruned
    criterion(model(data[0]), data[1]).backward()  # stale gradients
    before = snapshot(model)
    calls = {
        "magnitude": lambda: prune.magnitude(model, 0.5),
        "obd": lambda: prune.obd(model, criterion, data, 0.5, num_matvecs=4),
        "obs": lambda: prune.obs(model, criterion, data, 0.5, num_recomputations=2, num_grads=10, seed=0),
        "obs_dense": lambda: prune.obs_dense(model, torch.eye(35, dtype=torch.float64), 0.5),
        "gradual": lambda: prune.gradual(model, criterion, data, [0.3, 0.5], finetune_steps=3, batch_size=8)[0],
    }
    for name, call in calls.items():
        pruned = call()
        after = snapshot(model)
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), name
        assert before[1:2] == after[1:2] and before[3] == after[3], name
        assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                   for a, b in zip(before[2], after[2])), name
        assert sum(g is not None for g in before[2]) == 3, name  # the frozen weight has no gradient
        assert pruned is not model and prune.sparsity(pruned).overall == pytest.approx(0.5, abs=0.02), name
        assert [m.training for m in pruned.modules()] == before[1], name  # the copy keeps the modes
        assert [p.requires_grad for p in pruned.parameters()] == before[3], name
        assert all(p.grad is None for p in pruned.parameters()), name


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(problem):
    model, criterion, data = problem
    for bad in (-0.1, 1.0, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            prune.magnitude(model, bad)
        with pytest.raises(ValueError, match="sparsity"):
            prune.obs(model, criterion, data, bad)
    with pytest.raises(ValueError, match="scope"):
        prune.obs(model, criterion, data, 0.5, scope="row")
    with pytest.raises(ValueError, match="method"):
        prune.gradual(model, criterion, data, [0.5], method="snip")
    with pytest.raises(ValueError, match="optimizer"):
        prune.gradual(model, criterion, data, [0.5], optimizer="lbfgs")
    with pytest.raises(ValueError, match="data"):
        prune.obs(model, criterion, [], 0.5)
    with pytest.raises(ValueError, match="data"):
        prune.obd(model, criterion, [], 0.5)
    with pytest.raises(ValueError, match="data"):
        prune.gradual(model, criterion, [], [0.5])
    with pytest.raises(ValueError, match="block_size"):
        prune.obs(model, criterion, data, 0.5, block_size=0)
    with pytest.raises(ValueError, match="num_grads"):
        prune.obs(model, criterion, data, 0.5, num_grads=0)
    with pytest.raises(ValueError, match="num_grads"):
        prune.obs(model, criterion, data, 0.5, num_grads=41)  # more than the 40 samples
    with pytest.raises(ValueError, match="damping"):
        prune.obs(model, criterion, data, 0.5, damping=0)
    with pytest.raises(ValueError, match="num_recomputations"):
        prune.obs(model, criterion, data, 0.5, num_recomputations=0)
    with pytest.raises(ValueError, match="layers"):
        prune.magnitude(model, 0.5, layers=["nope"])
    with pytest.raises(ValueError, match="no weight"):
        prune.magnitude(model, 0.5, layers=["2"])  # the Tanh
    with pytest.raises(TypeError, match="model"):
        prune.magnitude("model", 0.5)
    with pytest.raises(ValueError, match="curvature"):
        prune.obd(model, criterion, data, 0.5, curvature="kfac")
    with pytest.raises(ValueError, match="curvature"):
        prune.obd(model, criterion, data, 0.5, curvature=torch.ones(7))
    with pytest.raises(ValueError, match="hessian"):
        prune.obs_dense(model, torch.eye(7), 0.5)
    with pytest.raises(ValueError, match="positive definite"):
        prune.obs_dense(model, -torch.eye(35, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="hessian: not positive definite"):  # singular, undamped
        prune.obs_dense(model, torch.zeros(35, 35, dtype=torch.float64), 0.5, damping=0)
    with pytest.raises(ValueError, match="damping"):
        prune.obs_dense(model, torch.eye(35, dtype=torch.float64), 0.5, damping=-1)
    with pytest.raises(ValueError, match="sparsities"):
        prune.gradual(model, criterion, data, [0.7, 0.5])
    with pytest.raises(ValueError, match="sparsities"):
        prune.gradual(model, criterion, data, [])
    with pytest.raises(ValueError, match=r"sparsities\[1\]"):
        prune.gradual(model, criterion, data, [0.5, 1.0])
    with pytest.raises(TypeError, match="num_grads"):
        prune.gradual(model, criterion, data, [0.5], method="magnitude", num_grads=8)
    with pytest.raises(ValueError, match="lr"):
        prune.gradual(model, criterion, data, [0.5], lr=0)
    with pytest.raises(ValueError, match="block_size"):
        prune.FisherInverse(torch.ones(3, 4), block_size=0)
    with pytest.raises(ValueError, match="inverse"):
        prune.obs_with_inverse(model, prune.FisherInverse(torch.ones(3, 4)), 0.5)


# --------------------------------------------------------------------------- gradual
@pytest.mark.parametrize("method, optimizer", [("obs", "sgd"), ("magnitude", "adam"), ("obd", "sgd")])
def test_gradual_keeps_pruned_weights_at_zero(problem, method, optimizer):
    model, criterion, data = problem
    kwargs = {"obs": dict(block_size=8, damping=1e-4), "obd": dict(curvature="empirical_fisher"), "magnitude": {}}
    accuracy = lambda m: {"accuracy": (m(data[0]).argmax(1) == data[1]).double().mean().item()}  # noqa: E731
    pruned, history = prune.gradual(model, criterion, data, [0.3, 0.6, 0.8], method=method, finetune_steps=15,
                                    lr=0.02, optimizer=optimizer, batch_size=10, evaluate=accuracy,
                                    **kwargs[method])
    assert prune.sparsity(pruned).overall == round(0.8 * 35) / 35  # fine-tuning revived nothing
    assert history.sparsity == [round(s * 35) / 35 for s in (0.3, 0.6, 0.8)]
    assert history.targets == [0.3, 0.6, 0.8] and history.method == method
    assert [len(t) for t in history.train_losses] == [15, 15, 15]
    assert len(history.loss_pruned) == len(history.loss_finetuned) == len(history.metrics_finetuned) == 3
    assert set(history.metrics_pruned[0]) == {"accuracy"} and "accuracy" in history.dense_metrics
    assert history.loss_finetuned[-1] < history.loss_pruned[-1]  # fine-tuning recovers some loss
    assert history.dense_loss == pytest.approx(criterion(model(data[0]), data[1]).item())

    # one stage: the mask is the one the pruning method chose, kept through fine-tuning
    one, _ = prune.gradual(model, criterion, data, [0.5], method=method, finetune_steps=10, lr=0.05,
                           optimizer=optimizer, **kwargs[method])
    direct = {"obs": lambda: prune.obs(model, criterion, data, 0.5, **kwargs["obs"]),
              "obd": lambda: prune.obd(model, criterion, data, 0.5, **kwargs["obd"]),
              "magnitude": lambda: prune.magnitude(model, 0.5)}[method]()
    assert torch.equal(weights(one) == 0, weights(direct) == 0)
    assert not torch.equal(weights(one), weights(direct))  # ... while the other weights were trained
