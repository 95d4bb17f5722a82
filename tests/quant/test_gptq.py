"""GPTQ (Frantar et al., ICLR 2023) against a sequential OBQ reference written here from the paper's
equations (column by column, explicit inverse-Hessian downdates, float64), and its promises: the
lazy block size does not change the result, outputs land on the grid, the layer-wise error is
below round-to-nearest's, the reported losses are the quadratic form they claim to be, dead
inputs, the Cholesky failure message, the sequential model loop, no mutation, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hesskit as hk
from hesskit.quant.fake import grid, quantize_model, round_to_grid
from hesskit.quant.gptq import gptq, gptq_layer, gptq_layers, layer_hessian, layer_inputs, round_to_nearest

D = torch.float64


# ----------------------------------------------------------------------------- the reference
def obq_reference(W, H, bits, damping=0.01, group_size=None, act_order=False, symmetric=False):
    """OBQ with GPTQ's fixed column order, from the equations: quantize column j of every row,
    W <- W - (w_j - q_j) / [H^-1]_jj * H^-1[j, :], then H^-1 <- H^-1 - H^-1[:, j] H^-1[j, :] / [H^-1]_jj.
    Dead inputs, damping, grids and the act-order permutation as described in the paper and code."""
    W, H = W.clone().to(D), H.clone().to(D)
    rows, cols = W.shape
    scale, zero, qmin, qmax = grid(W, bits, symmetric)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols)
    Hinv = torch.linalg.inv(H + damping * H.diagonal().mean() * torch.eye(cols, dtype=D))
    Q, loss = torch.zeros_like(W), torch.zeros(rows, dtype=D)
    for k, j in enumerate(order.tolist()):
        if group_size and k % group_size == 0:
            scale, zero, qmin, qmax = grid(W[:, order[k : k + group_size]], bits, symmetric)
        q = round_to_grid(W[:, j : j + 1], scale, zero, qmin, qmax)[:, 0]
        d = Hinv[j, j]
        Q[:, j], loss = q, loss + (W[:, j] - q) ** 2 / d / 2
        W -= ((W[:, j] - q) / d)[:, None] * Hinv[j][None, :]
        Hinv -= torch.outer(Hinv[:, j], Hinv[j]) / d
    return Q, loss


def problem(rows=6, cols=12, samples=40, seed=0, dtype=D, dead=()):
    """A weight and H = 2/N X X^T of correlated inputs (columns of X), some inputs always 0."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen, dtype=D)
    X = torch.randn(cols, cols, generator=gen, dtype=D) @ torch.randn(cols, samples, generator=gen, dtype=D)
    X = X * torch.linspace(0.3, 3.0, cols, dtype=D)[torch.randperm(cols, generator=gen)][:, None]
    X[list(dead)] = 0
    return W.to(dtype), (2 / samples * X @ X.T).to(dtype), X.to(dtype)


# ----------------------------------------------------------------------------- the core function
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("options", [
    {}, {"act_order": True}, {"group_size": 4}, {"group_size": 3, "act_order": True}, {"symmetric": True},
    {"damping": 0.0}, {"damping": 0.3, "group_size": 6},
])
def test_matches_the_sequential_obq_reference(bits, options):
    W, H, _ = problem(seed=bits)
    Q, loss = gptq_layer(W, H, bits, block_size=5, **options)
    Q_ref, loss_ref = obq_reference(W, H, bits, **options)
    torch.testing.assert_close(Q, Q_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("options", [{}, {"group_size": 4}, {"act_order": True, "group_size": 6}])
def test_block_size_does_not_change_the_result(options):
    W, H, _ = problem(rows=5, cols=24, samples=60, seed=3)
    Q, loss = gptq_layer(W, H, 3, block_size=128, **options)  # one block, larger than the 24 columns
    for block_size in (1, 5, 7, 24):
        Qb, loss_b = gptq_layer(W, H, 3, block_size=block_size, **options)
        torch.testing.assert_close(Qb, Q, rtol=0, atol=1e-12)
        torch.testing.assert_close(loss_b, loss, rtol=1e-12, atol=0)


def test_losses_are_the_damped_quadratic_form_of_the_final_error():
    # sum_j (w_j - q_j)^2 / (2 [H_F^-1]_jj) telescopes to 1/2 (w - q)^T H_damped (w - q) for each row
    W, H, _ = problem(seed=5, dead=(2,))
    for damping in (0.0, 0.01, 1.0):
        Q, loss = gptq_layer(W, H, 3, damping=damping)
        Hd = H.clone()
        Hd[2, 2] = 1
        Hd += damping * Hd.diagonal().mean() * torch.eye(12, dtype=D)
        delta = W.clone()
        delta[:, 2] = 0  # the dead column's weight is set to 0 before quantizing
        delta -= Q
        torch.testing.assert_close(loss, 0.5 * ((delta @ Hd) * delta).sum(1), rtol=1e-10, atol=1e-14)


def test_every_output_lands_on_the_grid():
    W, H, _ = problem(rows=8, cols=16, seed=7, dtype=torch.float32)
    for bits in (2, 3, 4, 8):
        for symmetric in (False, True):
            Q, _ = gptq_layer(W, H, bits, symmetric=symmetric)
            scale, zero, qmin, qmax = grid(W, bits, symmetric)  # per row, from the original weights
            assert torch.equal(round_to_grid(Q, scale, zero, qmin, qmax), Q)
            codes = Q / scale + zero
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    assert Q.dtype == torch.float32


def _on_group_grids(Q, bits, group_size, order):
    """Within each row and group (consecutive columns of `order`): at most 2^bits values, all integer
    multiples of one step (every grid holds 0)."""
    for start in range(0, Q.shape[1], group_size):
        block = Q[:, order[start : start + group_size]]
        for row in block:
            values = torch.unique(row)
            assert len(values) <= 2**bits
            gaps = values.diff()
            if len(gaps):
                steps = values / gaps.min()
                assert torch.allclose(steps, steps.round(), atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_groups_have_their_own_grids(act_order):
    W, H, _ = problem(rows=5, cols=24, samples=60, seed=11)
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(24)
    Q8, _ = gptq_layer(W, H, 2, group_size=8, act_order=act_order)
    _on_group_grids(Q8, 2, 8, order)
    Q_row, _ = gptq_layer(W, H, 2, act_order=act_order)
    assert not torch.allclose(Q8, Q_row)
    # a single group of all columns is the per-row grid (no dead columns here)
    torch.testing.assert_close(gptq_layer(W, H, 2, group_size=24, act_order=act_order)[0], Q_row, rtol=0, atol=1e-12)
    # a group size that does not divide the 24 columns leaves a smaller last group (4 columns) with its own grid
    Q5, _ = gptq_layer(W, H, 2, group_size=5, act_order=act_order)
    for start in range(0, 24, 5):
        assert all(len(torch.unique(row)) <= 4 for row in Q5[:, order[start : start + 5]])
    with pytest.raises(ValueError, match="group_size"):
        gptq_layer(W, H, 2, group_size=0)


def test_act_order_changes_the_order_and_stays_on_the_grid():
    W, H, _ = problem(seed=13)
    assert not torch.equal(torch.argsort(H.diagonal(), descending=True), torch.arange(12))
    Q, loss = gptq_layer(W, H, 2)
    Qa, loss_a = gptq_layer(W, H, 2, act_order=True)
    assert not torch.allclose(Q, Qa)
    scale, zero, qmin, qmax = grid(W, 2, False)
    assert torch.equal(round_to_grid(Qa, scale, zero, qmin, qmax), Qa)
    # the order is descending diag(H): permuting the columns and H by it beforehand gives the same answer
    perm = torch.argsort(H.diagonal(), descending=True)
    Qp, _ = gptq_layer(W[:, perm], H[perm][:, perm], 2)
    torch.testing.assert_close(Qa[:, perm], Qp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_reconstructs_better_than_round_to_nearest(bits):
    # ||W X - Q X||^2 on the calibration inputs, float32 as in practice; RTN uses the same per-row grids
    for seed in range(3):
        W, H, X = problem(rows=32, cols=48, samples=256, seed=100 + seed, dtype=torch.float32)
        Q, loss = gptq_layer(W, H, bits)
        rtn = round_to_grid(W, *grid(W, bits, False))
        gptq_error = ((W - Q) @ X).pow(2).sum()
        rtn_error = ((W - rtn) @ X).pow(2).sum()
        assert gptq_error < 0.7 * rtn_error
        # what gptq_layer reports is that error (H = 2/N X X^T) plus the damping's share
        damping_term = 256 / 2 * 0.01 * H.diagonal().mean() * (W - Q).pow(2).sum()
        assert loss.sum() * 256 == pytest.approx((gptq_error + damping_term).item(), rel=1e-4)


def test_dead_inputs_are_zeroed_and_decouple():
    W, H, _ = problem(seed=17, dead=(3, 8))
    W[:, 3], W[:, 8] = W[:, 0] * 0.1, -W[:, 1] * 0.1  # inside each row's range: the row grids are unchanged
    Q, loss = gptq_layer(W, H, 3, damping=0.0)  # H is singular, but the dead inputs are handled
    assert (Q[:, [3, 8]] == 0).all()
    live = [j for j in range(12) if j not in (3, 8)]
    Q_live, loss_live = gptq_layer(W[:, live], H[live][:, live], 3, damping=0.0)
    torch.testing.assert_close(Q[:, live], Q_live, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, loss_live, rtol=1e-10, atol=1e-14)


def test_a_failed_cholesky_says_what_to_change():
    W, H, _ = problem(rows=4, cols=12, samples=3, seed=19)  # rank 3 < 12 columns
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match=r"raise damping \(e.g. 0.1\) or use more calibration samples"):
            gptq_layer(W.to(dtype), H.to(dtype), 4, damping=0.0)
    Q, _ = gptq_layer(W, H, 4, damping=0.01)
    assert torch.isfinite(Q).all()
    model = nn.Sequential(nn.Linear(12, 4))
    with pytest.raises(ValueError, match="layer '0'.*raise damping"):
        gptq(model, torch.randn(3, 12), 4, damping=0.0)


def test_inputs_are_not_modified():
    W, H, _ = problem(seed=23, dead=(1,))
    W0, H0 = W.clone(), H.clone()
    gptq_layer(W, H, 2, act_order=True, group_size=4)
    assert torch.equal(W, W0) and torch.equal(H, H0)


# ----------------------------------------------------------------------------- the layer Hessian
@pytest.mark.parametrize("kwargs", [
    {"stride": 1, "padding": 1}, {"stride": 2, "padding": 1}, {"stride": 1, "padding": 2, "dilation": 2},
    {"stride": 1, "padding": "same"}, {"stride": 1, "padding": 1, "padding_mode": "reflect"},
    {"stride": (2, 1), "padding": (0, 1)},
])
def test_conv_inputs_reproduce_the_convolution(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, **kwargs).double()
    x = torch.randn(4, 3, 9, 8, dtype=D)
    X = layer_inputs(conv, x)
    out = conv(x) - conv.bias[:, None, None]
    assert X.shape == (4 * out.shape[2] * out.shape[3], 27)
    torch.testing.assert_close((X @ conv.weight.flatten(1).T).reshape(4, -1, 5), out.flatten(2).transpose(1, 2))


def test_layer_hessian_is_the_running_mean_of_2xx():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(23, 5, dtype=D)
    batches = [(x[:10], None), (x[10:20], None), (x[20:], None)]  # (x, y) pairs contribute x
    inputs = torch.tanh(model[0](x)).detach()
    expected = 2 / 23 * inputs.T @ inputs
    torch.testing.assert_close(layer_hessian(model, "2", batches), expected)
    torch.testing.assert_close(layer_hessian(model, model[2], x), expected)
    tokens = torch.randn(3, 7, 5, dtype=D)  # sequences: one x per token
    flat = tokens.reshape(-1, 5)
    torch.testing.assert_close(layer_hessian(model, "0", tokens), 2 / 21 * flat.T @ flat)


def test_conv_layer_hessian_and_gptq_on_a_cnn():
    torch.manual_seed(0)
    model = hk.models.SmallCNN((4, 6)).double().eval()
    (x, _), _ = hk.data.digits()
    x = x[:20].double()
    H = layer_hessian(model, "3", x)
    X = layer_inputs(model[3], model[2](model[1](model[0](x))))  # conv -> tanh -> pool -> [this conv]
    torch.testing.assert_close(H, 2 / len(X) * X.T @ X)
    q = gptq(model, x, 3)
    for name in ("0", "3", "7"):
        W = model.get_submodule(name).weight.flatten(1)
        Q = q.get_submodule(name).weight.flatten(1)
        assert torch.equal(round_to_grid(Q, *grid(W, 3, False)), Q)


# ----------------------------------------------------------------------------- whole models
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_layers_are_quantized_sequentially_on_the_quantized_copy():
    model = mlp()
    x = torch.randn(50, 6, dtype=D)
    q = gptq(model, x, 2, group_size=None)
    manual, parallel = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for name in ("0", "2", "4"):  # each H from the copy whose earlier layers are already quantized
            Q, _ = gptq_layer(manual.get_submodule(name).weight, layer_hessian(manual, name, x), 2)
            manual.get_submodule(name).weight.copy_(Q)
            Qp, _ = gptq_layer(model.get_submodule(name).weight, layer_hessian(model, name, x), 2)
            parallel.get_submodule(name).weight.copy_(Qp)
    for name in ("0", "2", "4"):
        torch.testing.assert_close(q.get_submodule(name).weight, manual.get_submodule(name).weight, rtol=0, atol=0)
        torch.testing.assert_close(q.get_submodule(name).bias, model.get_submodule(name).bias, rtol=0, atol=0)
    assert torch.equal(q[0].weight, parallel[0].weight)  # the first layer sees the same inputs ...
    assert not torch.equal(q[2].weight, parallel[2].weight)  # ... later ones see the quantized model's


def test_layers_option_and_embeddings_stay_float():
    torch.manual_seed(0)
    model = hk.models.TinyTransformer(vocab=5, dim=8, heads=2)
    tokens, _ = hk.data.sequences(n=16, length=6, vocab=5, seed=0)
    assert list(gptq_layers(model)) == ["attn.qkv", "attn.out", "mlp.0", "mlp.2", "head"]
    q = gptq(model, tokens, 3)
    assert torch.equal(q.embed.weight, model.embed.weight)
    assert all(not torch.equal(q.get_submodule(n).weight, model.get_submodule(n).weight) for n in gptq_layers(model))
    only = gptq(model, tokens, 3, layers=["head", "attn.qkv"])
    assert torch.equal(only.mlp[0].weight, model.mlp[0].weight)
    assert torch.equal(only.attn.qkv.weight, q.attn.qkv.weight)  # the first quantized layer: same inputs
    assert torch.equal(only.attn.out.weight, model.attn.out.weight)
    assert not torch.equal(only.head.weight, model.head.weight)
    with pytest.raises(ValueError, match=r"\[.embed.\], not Linear/Conv1D/Conv2d layers"):
        gptq(model, tokens, 3, layers=["embed"])
    with pytest.raises(ValueError, match="nope"):
        gptq(model, tokens, 3, layers="nope")


def test_round_to_nearest_uses_the_same_grids():
    model = mlp()
    r = round_to_nearest(model, 3, group_size=None)
    expected = quantize_model(model, 3, granularity="channel", symmetric=False)
    assert all(torch.equal(a, b) for a, b in zip(r.parameters(), expected.parameters()))
    r2 = round_to_nearest(model, 2, group_size=2, symmetric=True, layers=["0", "2"])
    torch.testing.assert_close(r2[2].weight, hk.quant.fake_quantize(model[2].weight, 2, True, "columns", 2))
    assert torch.equal(r2[4].weight, model[4].weight)
    r3 = round_to_nearest(model, 2, group_size=2)  # layer '4' has 5 columns: its last group is one column
    torch.testing.assert_close(r3[4].weight, hk.quant.fake_quantize(model[4].weight, 2, False, "columns", 2))


def test_the_model_is_not_modified_and_the_copy_keeps_its_state():
    torch.manual_seed(0)
    model = hk.models.BatchNormCNN((3, 4)).double()  # train mode: the calibration passes must not touch BN stats
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[4].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (x, _), _ = hk.data.digits()
    x = x[:16].double()
    x0 = x.clone()
    q = gptq(model, x, 4)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and not model[4].weight.requires_grad
    assert torch.equal(x, x0)
    assert q.training and all(m.training for m in q.modules())
    assert q[0].weight.grad is None and not q[4].weight.requires_grad and q[0].weight.requires_grad
    for name in ("1.running_mean", "1.running_var", "5.running_mean"):
        assert torch.equal(q.state_dict()[name], state[name])
    assert not torch.equal(q[0].weight, model[0].weight)


def test_bad_inputs_get_clear_errors():
    W, H, _ = problem()
    model, x = mlp(), torch.randn(10, 6, dtype=D)
    cases = [
        (dict(bits=0), ValueError, "bits"), (dict(bits=17), ValueError, "bits"),
        (dict(bits=1, symmetric=True), ValueError, "bits"), (dict(bits=2.0), ValueError, "bits"),
        (dict(group_size=0), ValueError, "group_size"), (dict(group_size=2.5), ValueError, "group_size"),
        (dict(group_size=True), ValueError, "group_size"), (dict(damping=-0.1), ValueError, "damping"),
        (dict(damping=float("nan")), ValueError, "damping"), (dict(damping=float("inf")), ValueError, "damping"),
        (dict(damping="0.01"), ValueError, "damping"), (dict(block_size=0), ValueError, "block_size"),
        (dict(act_order="yes"), TypeError, "act_order"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"bits": 3, **kwargs}
        with pytest.raises(error, match=match):
            gptq_layer(W, H, **kwargs)
        with pytest.raises(error, match=match):
            gptq(model, x, **kwargs)
    with pytest.raises(ValueError, match="weight"):
        gptq_layer(W[0], H, 3)
    with pytest.raises(ValueError, match="hessian"):
        gptq_layer(W, H[:5, :5], 3)
    with pytest.raises(TypeError, match="weight"):
        gptq_layer(W.long(), H, 3)
    with pytest.raises(TypeError, match="hessian"):
        gptq_layer(W, H.numpy(), 3)
    with pytest.raises(ValueError, match="finite"):
        gptq_layer(W, H * float("nan"), 3)
    with pytest.raises(ValueError, match="calibration_inputs.*empty"):
        gptq(model, torch.empty(0, 6, dtype=D), 3)
    with pytest.raises(ValueError, match="calibration_inputs.*empty"):
        gptq(model, [], 3)
    with pytest.raises(TypeError, match="calibration_inputs"):
        gptq(model, 3.0, 3)
    with pytest.raises(TypeError, match="model"):
        gptq("model", x, 3)
    with pytest.raises(ValueError, match="at least one layer"):
        gptq(model, x, 3, layers=[])
    with pytest.raises(ValueError, match="group_size"):
        gptq(model, x, 3, group_size=0)
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.extra = nn.Linear(6, 3), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="'extra'.*no input"):
        gptq(Unused(), x.float(), 3)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped"):
        gptq(grouped, torch.randn(2, 4, 5, 5), 3)
    with pytest.raises(TypeError, match="Conv1D and nn.Conv2d, got Embedding"):
        layer_hessian(nn.Sequential(nn.Embedding(4, 3)), "0", torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="not a module"):
        layer_hessian(model, "9", x)
