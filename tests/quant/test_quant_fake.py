# The fake-quantization foundation (hesskit/quant/fake.py) against references written here from the
# equations (Jacob et al. 2018; HAWQ's symmetric grid, GPTQ's asymmetric grid with 0 forced into the
# range): one explicit loop over the groups of every granularity, hand-counted model sizes, the
# straight-through gradients, and the promise that no public function mutates its input model.

import math

import pytest
import torch
from torch import nn

import hesskit.quant as Q
from hesskit.quant.fake import (ActivationQuantizer, LayerSwapper, QuantizedLayer, grid, layer_bits, round_to_grid,
                                ste_fake_quantize)
from hesskit.models import MLP, BatchNormCNN, SmallCNN, TinyTransformer

GRANULARITIES = ["tensor", "channel", "rows", "columns"]


# ----------------------------------------------------------------------------- the reference
def group_slices(shape, granularity, group_size):
    """The groups as index tuples into w.reshape(rows, cols): explicit, one per group."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    if granularity == "tensor":
        return [(slice(None), slice(None))]
    if granularity == "channel":
        return [(r, slice(None)) for r in range(rows)]
    if granularity == "rows":
        return [(slice(k * group_size, (k + 1) * group_size), slice(None)) for k in range(rows // group_size)]
    return [(r, slice(k * group_size, (k + 1) * group_size)) for r in range(rows) for k in range(cols // group_size)]


def reference_grid(values, bits, symmetric):
    """(scale, zero, qmin, qmax) of one group, from the module docstring's equations."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -(2 ** (bits - 1))
        m = values.abs().max().item()
        return (m / qmax if m > 0 else 1.0), 0.0, qmin, qmax
    qmin, qmax = 0, 2**bits - 1
    lo, hi = min(values.min().item(), 0.0), max(values.max().item(), 0.0)
    s = (hi - lo) / qmax if hi > lo else 1.0
    return s, float(round(-lo / s)), qmin, qmax


def reference_quantize(w, bits, symmetric, granularity, group_size=None):
    """Fake quantization written group by group; also returns every group's (scale, zero, qmin, qmax)."""
    W = w.detach().double().reshape(w.shape[0], -1).clone()
    out, grids = torch.empty_like(W), []
    for index in group_slices(tuple(w.shape), granularity, group_size):
        v = W[index]
        s, z, qmin, qmax = reference_grid(v, bits, symmetric)
        q = torch.clamp(torch.round(v / s) + z, qmin, qmax)
        out[index] = s * (q - z)
        grids.append((index, s, z, qmin, qmax))
    return out.reshape(w.shape), grids


def weights(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype)


CASES = [  # (shape, granularity, group_size)
    ((12, 10), "tensor", None),
    ((12, 10), "channel", None),
    ((12, 10), "rows", 3),
    ((12, 10), "rows", 12),
    ((12, 10), "columns", 5),
    ((12, 10), "columns", 1),
    ((6, 4, 3, 3), "tensor", None),  # a conv weight: rows are output channels, columns (in, kh, kw)
    ((6, 4, 3, 3), "channel", None),
    ((6, 4, 3, 3), "rows", 2),
    ((6, 4, 3, 3), "columns", 9),
]


# ----------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,granularity,group_size", CASES)
def test_fake_quantize_matches_the_group_by_group_reference(shape, granularity, group_size, bits, symmetric):
    w = weights(shape, seed=bits)
    got = Q.fake_quantize(w, bits, symmetric, granularity, group_size)
    expected, grids = reference_quantize(w, bits, symmetric, granularity, group_size)
    assert got.shape == w.shape and got.dtype == w.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    G = got.reshape(shape[0], -1)
    W = w.reshape(shape[0], -1)
    for index, s, z, qmin, qmax in grids:
        q = G[index] / s + z  # the integer codes
        assert torch.allclose(q, q.round(), atol=1e-9), "a value is off the grid"
        assert q.min() >= qmin - 1e-9 and q.max() <= qmax + 1e-9, "a code is outside [qmin, qmax]"
        # the range covers the group: nothing is clipped by more than half a step
        assert (G[index] - W[index]).abs().max() <= s / 2 * (1 + 1e-9)
        levels = G[index].unique().numel()
        assert levels <= 2**bits
        if symmetric:  # q = -2^(b-1) is never reached with s = max|w| / (2^(b-1) - 1)
            assert levels <= 2**bits - 1
            assert (G[index].abs().max() - W[index].abs().max()).abs() <= 1e-12  # max|w| is a grid point


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_symmetric_codes_and_asymmetric_zero(bits):
    w = weights((8, 16), seed=1)
    w[::3, ::4] = 0.0  # exact zeros
    sym = Q.fake_quantize(w, bits, True, "channel")
    scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    codes = sym / scale
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(codes.round(), torch.round(w / scale))  # symmetric: plain rounding, no clamping needed
    for granularity, g in [("tensor", None), ("channel", None), ("rows", 2), ("columns", 4)]:
        asym = Q.fake_quantize(w, bits, False, granularity, g)
        assert (asym[w == 0] == 0).all(), "asymmetric grids must represent 0 exactly"
    # a row of positive weights: 0 is forced into the range, so the smallest level is 0, not min(w)
    positive = torch.linspace(1.0, 2.0, 7, dtype=torch.float64)[None]
    asym = Q.fake_quantize(positive, bits, False, "channel")
    s = 2.0 / (2**bits - 1)
    codes = asym / s
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert asym.max() == pytest.approx(2.0)


def test_one_bit_asymmetric_and_zero_groups():
    w = weights((4, 6), seed=2)
    one = Q.fake_quantize(w, 1, symmetric=False, granularity="channel")
    for row in one:
        assert row.unique().numel() <= 2 and (row == 0).any()
    w[1] = 0.0  # a row of zeros gets scale 1 and stays 0
    for symmetric in (True, False):
        out = Q.fake_quantize(w, 3, symmetric, "channel")
        assert (out[1] == 0).all() and torch.isfinite(out).all()
    scale, zero, qmin, qmax = grid(w, 3, symmetric=True)
    assert scale[1].item() == 1.0 and (zero == 0).all() and (qmin, qmax) == (-4, 3)
    assert Q.fake_quantize(torch.zeros(5), 4).eq(0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_and_round_to_grid_are_per_row_quantization(symmetric):
    w = weights((5, 9), seed=3)
    scale, zero, qmin, qmax = grid(w, 4, symmetric)
    assert scale.shape == zero.shape == (5, 1)
    expected, grids = reference_quantize(w, 4, symmetric, "channel")
    for (index, s, z, lo, hi), s_got, z_got in zip(grids, scale[:, 0], zero[:, 0]):
        assert s_got.item() == pytest.approx(s, rel=1e-12) and z_got.item() == z and (lo, hi) == (qmin, qmax)
    torch.testing.assert_close(round_to_grid(w, scale, zero, qmin, qmax), expected, rtol=0, atol=1e-12)
    err = Q.quantization_error(w, 4, symmetric, "channel")
    assert err == pytest.approx(((expected - w) ** 2).sum().item(), rel=1e-12)


def test_float32_input_stays_float32_and_unmodified():
    w = weights((6, 8), seed=4, dtype=torch.float32).requires_grad_()
    before = w.detach().clone()
    out = Q.fake_quantize(w, 3, granularity="rows", group_size=2)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(w.detach(), before)
    expected, _ = reference_quantize(w, 3, False, "rows", 2)  # the default grid is asymmetric
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- straight-through gradients
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("rows", 2), ("columns", 3)])
def test_ste_forward_is_fake_quantize_and_gradient_is_identity(granularity, group_size):
    w = weights((4, 6), seed=5).requires_grad_()
    out = ste_fake_quantize(w, 2, True, granularity, group_size)
    assert torch.equal(out.detach(), Q.fake_quantize(w, 2, True, granularity, group_size))
    upstream = weights((4, 6), seed=6)
    (grad,) = torch.autograd.grad(out, w, upstream)
    assert torch.equal(grad, upstream)


def test_activation_quantizer_range_and_gradient():
    aq = ActivationQuantizer(4).double()
    with pytest.raises(RuntimeError, match="no range"):
        aq.observing = False
        aq(torch.zeros(3, dtype=torch.float64))
    aq.observing = True
    first = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    aq(first)
    assert aq.low.item() == -1.0 and aq.high.item() == 3.0  # the first batch sets the range
    aq(torch.tensor([1.0, 5.0], dtype=torch.float64))  # min clamps to 0 (0 is always in the range)
    assert aq.low.item() == pytest.approx(0.99 * -1.0 + 0.01 * 0.0)
    assert aq.high.item() == pytest.approx(0.99 * 3.0 + 0.01 * 5.0)
    Q.observe_activations(nn.Sequential(aq), False)
    low, high = aq.low.item(), aq.high.item()
    x = torch.tensor([-3.0, -0.99, -0.2, 0.0, 0.7, 2.9, 3.02, 10.0], dtype=torch.float64, requires_grad=True)
    y = aq(x)
    assert aq.low.item() == low and aq.high.item() == high  # fixed once observing is off
    s = (high - low) / 15
    z = round(-low / s)
    expected = s * (torch.clamp(torch.round(x.detach() / s) + z, 0, 15) - z)
    torch.testing.assert_close(y.detach(), expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(y, x, torch.full_like(x, 2.0))
    level = torch.round(x.detach() / s) + z
    inside = (level >= 0) & (level <= 15)  # rounding lands on the grid without clamping
    assert inside.any() and (~inside).any()
    assert torch.equal(grad, 2.0 * inside.double())  # 1 where no clamp acts, 0 where it does


# ----------------------------------------------------------------------------- models: no mutation
def _models():
    torch.manual_seed(0)
    mlp = MLP(6, (5,), 3)
    cnn = SmallCNN((2, 3), hidden=4)
    bn = BatchNormCNN((2, 3))
    bn.train()  # left in train mode on purpose: the copies must keep it
    tt = TinyTransformer(vocab=5, dim=8, heads=2, max_length=6)
    return {"mlp": (mlp, torch.randn(7, 6)), "cnn": (cnn, torch.rand(3, 1, 8, 8)),
            "bn": (bn, torch.rand(4, 1, 8, 8)), "transformer": (tt, torch.randint(0, 5, (3, 6)))}


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.training,
            [(n, p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
            [type(m).__name__ for m in model.modules()])


def _assert_same(model, snap):
    state, training, params, types = snap
    now = _snapshot(model)
    assert now[1] == training and now[3] == types
    for k, v in state.items():
        assert torch.equal(now[0][k], v), k
    for (n, rg, g), (n2, rg2, g2) in zip(params, now[2]):
        assert n == n2 and rg == rg2 and (g is None) == (g2 is None)
        if g is not None:
            assert torch.equal(g, g2)


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn", "transformer"])
def test_quantize_model_quantization_aware_and_freeze_leave_the_input_alone(name):
    model, x = _models()[name]
    first = next(model.parameters())
    first.requires_grad_(False)  # a frozen parameter must stay frozen
    p = list(model.parameters())[1]
    p.grad = torch.ones_like(p)  # an existing .grad must survive
    snap = _snapshot(model)
    q = Q.quantize_model(model, 3, "channel")
    _assert_same(model, snap)
    assert q.training == model.training and not next(q.parameters()).requires_grad
    assert all(p.grad is None for p in q.parameters())
    qat = Q.quantization_aware(model, 3, granularity="channel")
    _assert_same(model, snap)
    assert sum(isinstance(m, QuantizedLayer) for m in qat.modules()) == len(Q.quantizable_layers(model))
    qat_snap = _snapshot(qat)
    frozen = Q.freeze(qat)
    _assert_same(qat, qat_snap)
    _assert_same(model, snap)
    assert not any(isinstance(m, QuantizedLayer) for m in frozen.modules())
    # without activation quantization the QAT model computes the function of quantize_model
    for m in (q, qat, frozen):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(qat(x), q(x), rtol=0, atol=0)
        torch.testing.assert_close(frozen(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn", "transformer"])
def test_freeze_equals_the_qat_model_with_activation_quantizers(name):
    model, x = _models()[name]
    granularity, group_size = ("rows", 1) if name != "transformer" else ("channel", None)
    # symmetric grids: re-quantizing a value on its grid gives it back exactly (asymmetric ones to rounding)
    qat = Q.quantization_aware(model, 4, act_bits=6, granularity=granularity, group_size=group_size, symmetric=True)
    qat.train()
    # a few optimizer steps, as in fine-tuning, so the float weights move off the grid
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        qat(x).float().pow(2).mean().backward()
        opt.step()
    Q.observe_activations(qat, False)
    acts = [m for m in qat.modules() if isinstance(m, ActivationQuantizer)]
    assert acts and all(torch.isfinite(m.low) and not m.observing for m in acts)
    qat.eval()
    frozen = Q.freeze(qat).eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), qat(x), rtol=0, atol=0)
    for m in frozen.modules():  # the frozen weights are on their grids
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            torch.testing.assert_close(m.weight, Q.fake_quantize(m.weight, 4, True, granularity, group_size),
                                       rtol=0, atol=0)


def test_observing_qat_model_is_not_switched_off_by_freeze():
    model, x = _models()["mlp"]
    qat = Q.quantization_aware(model, 4, act_bits=8)
    qat(x)
    frozen = Q.freeze(qat)
    assert all(m.observing for m in qat.modules() if isinstance(m, ActivationQuantizer))
    assert not any(m.observing for m in frozen.modules() if isinstance(m, ActivationQuantizer))


def test_quantize_model_bits_per_layer_and_float_layers():
    model, x = _models()["mlp"]
    names = list(Q.quantizable_layers(model))
    assert names == ["1", "3"]
    q = Q.quantize_model(model, {"1": 2}, "tensor")
    assert torch.equal(q[1].weight, Q.fake_quantize(model[1].weight, 2, granularity="tensor"))
    assert torch.equal(q[3].weight, model[3].weight)  # left out: stays float
    assert torch.equal(q[1].bias, model[1].bias)  # biases stay float
    assert layer_bits(model, 5) == {"1": 5, "3": 5}


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn", "transformer"])
def test_layer_swapper_configurations_are_quantize_model(name):
    """One working copy switched between configurations: each one is exactly `quantize_model`'s copy
    (precomputed widths and widths computed when applied alike), float again when a layer is left out."""
    model, x = _models()[name]
    snap = _snapshot(model)
    names = list(Q.quantizable_layers(model))
    swapper = LayerSwapper(model, names, (2, 4), "channel", mode="eval")
    assert swapper.model.training is False and not any(p.requires_grad for p in swapper.model.parameters())
    configs = [{names[0]: 2}, {n: 4 for n in names}, {names[-1]: 3}, {}, {n: 2 for n in names}]
    for config in configs:
        work = swapper.apply(config)
        expected = Q.quantize_model(model, config, "channel")
        for (key, a), b in zip(work.state_dict().items(), expected.state_dict().values()):
            assert torch.equal(a, b), (config, key)
    _assert_same(model, snap)
    ordinary = LayerSwapper(model, names, frozen=False).apply({})
    assert [p.requires_grad for p in ordinary.parameters()] == [p.requires_grad for p in model.parameters()]
    assert ordinary.training == model.training


# ----------------------------------------------------------------------------- model size by hand
class Net(nn.Module):
    """conv 2->4 (3x3): 72 weights + 4 bias; fc 8->6: 48 + 6; fc 6->4 without bias: 24."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 4, bias=False)


BITS = {"conv": 4, "fc1": 3, "fc2": 2}
# groups per layer (conv, fc1, fc2): tensor 1,1,1; channel 4,6,4; rows of 2: 2,3,2;
# columns of 2: conv rows hold 2*3*3 = 18 columns -> 4*9 = 36, fc1 6*4 = 24, fc2 4*3 = 12
GROUPS = {("tensor", None): (1, 1, 1), ("channel", None): (4, 6, 4), ("rows", 2): (2, 3, 2),
          ("columns", 2): (36, 24, 12)}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", list(GROUPS))
@pytest.mark.parametrize("scale_bits", [16, 32])
def test_model_size_by_hand(granularity, group_size, symmetric, scale_bits):
    size = Q.model_size(Net(), BITS, granularity, group_size, symmetric, scale_bits)
    assert size.weight_bits == 72 * 4 + 48 * 3 + 24 * 2 == 480
    assert size.quantized_weights == 144
    assert size.float_bits == (4 + 6) * 32
    groups = GROUPS[(granularity, group_size)]
    # each group stores a scale, and an asymmetric grid also a b-bit zero point
    expected = sum(g * (scale_bits + (0 if symmetric else b)) for g, b in zip(groups, (4, 3, 2)))
    assert size.overhead_bits == expected
    assert size.total_bits == 480 + expected + 320
    assert size.average_bits == pytest.approx(480 / 144)
    assert size.megabytes == pytest.approx(size.total_bits / 8 / 2**20)


def test_model_size_float_layers_dtypes_and_embeddings():
    size = Q.model_size(Net(), {"fc1": 3}, "tensor", symmetric=True)  # conv and fc2 stay float
    assert (size.weight_bits, size.overhead_bits, size.float_bits) == (144, 16, (72 + 4 + 6 + 24) * 32)
    size64 = Q.model_size(Net().double(), {"fc1": 3}, "tensor", symmetric=True)
    assert size64.float_bits == (72 + 4 + 6 + 24) * 64
    emb = nn.ModuleDict({"emb": nn.Embedding(5, 3), "lin": nn.Linear(3, 2)})
    size = Q.model_size(emb, {"emb": 8, "lin": 4}, "channel", symmetric=False)
    assert size.weight_bits == 15 * 8 + 6 * 4
    assert size.overhead_bits == 5 * (16 + 8) + 2 * (16 + 4)
    assert size.float_bits == 2 * 32
    tt = TinyTransformer(vocab=5, dim=8, heads=2, max_length=6, mlp_ratio=2)
    qkv = Q.model_size(tt, {"attn.qkv": 2}, "rows", 4, True)  # one range per head: 24 rows / 4 = 6 groups
    assert (qkv.weight_bits, qkv.overhead_bits) == (24 * 8 * 2, 6 * 16)
    total = sum(p.numel() for p in tt.parameters())
    assert qkv.float_bits == (total - 24 * 8) * 32


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bits", [0, 17, 2.0, 3.5, True, "4", None])
def test_bad_bits(bits):
    w = weights((4, 4))
    with pytest.raises(ValueError, match="bits"):
        Q.fake_quantize(w, bits)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize_model(Net(), bits)
    with pytest.raises(ValueError, match="bits"):
        Q.model_size(Net(), bits)


def test_one_bit_needs_an_asymmetric_grid():
    w = weights((4, 4))
    with pytest.raises(ValueError, match="bits.*symmetric"):
        Q.fake_quantize(w, 1, symmetric=True)
    Q.fake_quantize(w, 1)  # fine: the default grid is asymmetric
    with pytest.raises(ValueError, match="bits"):
        Q.fake_quantize(w, 0)
    with pytest.raises(ValueError, match=r"bits\['fc1'\]"):
        Q.quantize_model(Net(), {"fc1": 1}, symmetric=True)
    with pytest.raises(ValueError, match=r"bits\['fc1'\]"):
        Q.quantize_model(Net(), {"fc1": 0})
    with pytest.raises(ValueError, match="act_bits"):
        Q.quantization_aware(MLP(4, (3,), 2), 4, act_bits=0)


def test_bad_granularity_and_group_size():
    w = weights((6, 8))
    with pytest.raises(ValueError, match="granularity"):
        Q.fake_quantize(w, 4, granularity="per_group")
    for g in (None, 0, -2, 2.0):
        with pytest.raises(ValueError, match="group_size"):
            Q.fake_quantize(w, 4, granularity="rows", group_size=g)
    with pytest.raises(ValueError, match="group_size"):
        Q.fake_quantize(w, 4, granularity="tensor", group_size=2)
    with pytest.raises(ValueError, match="granularity"):
        Q.fake_quantize(torch.randn(6), 4, granularity="rows", group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        Q.model_size(Net(), 4, "rows", 0)
    with pytest.raises(ValueError, match="group_size"):
        Q.quantize_model(Net(), 4, "rows", -1)
    with pytest.raises(ValueError, match="group_size"):
        Q.quantization_aware(Net(), 4, granularity="rows", group_size=1.5)


def test_the_default_grid_is_asymmetric_per_channel_and_group_size_means_column_groups():
    """granularity=None: one range per output channel; with group_size, GPTQ's column groups; a vector
    has no channels (one range); an explicit "channel" or "tensor" with a group size is refused, naming
    the fix. symmetric=False by default. The same in every function that takes a quantizer."""
    w = weights((6, 8), seed=3)
    assert torch.equal(Q.fake_quantize(w, 3), Q.fake_quantize(w, 3, False, "channel"))
    assert torch.equal(Q.fake_quantize(w, 3, group_size=4), Q.fake_quantize(w, 3, False, "columns", 4))
    v = weights((6, 8), seed=5)[0]
    assert torch.equal(Q.fake_quantize(v, 3), Q.fake_quantize(v, 3, False, "tensor"))
    assert not torch.equal(Q.fake_quantize(v, 3), v)  # not one range per entry
    assert Q.quantization_error(w, 2, group_size=4) == Q.quantization_error(w, 2, False, "columns", 4)
    with pytest.raises(ValueError, match="group_size.*drop granularity="):
        Q.fake_quantize(w, 4, granularity="channel", group_size=2)
    net = Net()
    q = Q.quantize_model(net, 2, group_size=8)  # the call: column groups of 8
    assert q.compression.details["granularity"] == "columns" and not q.compression.details["symmetric"]
    assert torch.equal(q.fc1.weight, Q.fake_quantize(net.fc1.weight, 2, False, "columns", 8))
    assert Q.quantize_model(net, 2).compression.details["granularity"] == "channel"
    assert Q.model_size(net, 2, group_size=8) == Q.model_size(net, 2, "columns", 8, False)
    assert Q.model_size(net, 3) == Q.model_size(net, 3, "channel", None, False)
    qat = Q.quantization_aware(net, 3, group_size=8)
    assert qat.compression.details["granularity"] == "columns"
    assert {(m.granularity, m.group_size, m.symmetric) for m in qat.modules() if isinstance(m, QuantizedLayer)} == {
        ("columns", 8, False)}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity, group_size", [("rows", 4), ("columns", 3), ("rows", 5), ("columns", 5)])
def test_ragged_last_group_is_a_smaller_group(granularity, group_size, symmetric):
    """A group size that does not divide the rows (columns) leaves a smaller last group with its own range,
    exactly as quantizing that slice on its own; model_size counts its scale."""
    w = weights((6, 8), seed=3)
    out = Q.fake_quantize(w, 3, symmetric, granularity, group_size)
    extent = 6 if granularity == "rows" else 8
    for start in range(0, extent, group_size):
        part = w[start:start + group_size] if granularity == "rows" else w[:, start:start + group_size]
        got = out[start:start + group_size] if granularity == "rows" else out[:, start:start + group_size]
        alone = Q.fake_quantize(part, 3, symmetric, "tensor" if granularity == "rows" else "channel")
        torch.testing.assert_close(got, alone, rtol=0, atol=0)
    groups = -(-6 // group_size) if granularity == "rows" else 6 * -(-8 // group_size)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6, bias=False)

    size = Q.model_size(One(), 3, granularity, group_size, symmetric, scale_bits=16)
    assert size.overhead_bits == groups * (16 + (0 if symmetric else 3))
    with pytest.raises(ValueError, match="granularity"):
        Q.quantization_aware(Net(), 4, granularity="block")


def test_unknown_layers_and_other_bad_inputs():
    with pytest.raises(ValueError, match="unknown layer names"):
        Q.quantize_model(Net(), {"fc3": 4})
    with pytest.raises(ValueError, match="unknown layer names"):
        Q.model_size(Net(), {"fc1": 4, "conv.weight": 4})
    with pytest.raises(ValueError, match="unknown layer names"):
        Q.quantization_aware(Net(), {"nope": 4})
    with pytest.raises(TypeError, match="w"):
        Q.fake_quantize([1.0, 2.0], 4)
    with pytest.raises(TypeError, match="floating"):
        Q.fake_quantize(torch.arange(4), 4)
    with pytest.raises(ValueError, match="2-D"):
        grid(torch.randn(2, 3, 4), 4)
    with pytest.raises(ValueError, match="no Linear"):
        Q.quantizable_layers(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="model"):
        Q.quantizable_layers("model")
    with pytest.raises(ValueError, match="scale_bits"):
        Q.model_size(Net(), 4, scale_bits=0)
    with pytest.raises(ValueError, match="bare layer"):
        Q.quantization_aware(nn.Linear(3, 2), 4)
    with pytest.raises(TypeError, match="model"):
        Q.quantization_aware(None, 4)


def test_non_finite_weights_raise():
    w = weights((4, 4), seed=7)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        Q.fake_quantize(w, 4, granularity="channel")


def test_the_package_exports_user_verbs_and_the_helpers_stay_in_their_modules():
    assert all(hasattr(Q, name) for name in Q.__all__)
    helpers = {"grid", "round_to_grid", "ste_fake_quantize", "layer_weight", "layer_bits", "LayerSwapper",
               "check_layers", "QuantizedLayer", "ActivationQuantizer", "rank_correlation", "exhaustive",
               "round_to_nearest", "gptq_layer", "layer_hessian"}
    assert not helpers & set(Q.__all__)
