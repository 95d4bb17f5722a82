"""HAWQ / Q-BERT / measured sensitivities against dense float64 answers on a tiny MLP.

The Hessian of each layer's weight comes from `reference.hessian` (autograd row by row, independent
of hesskit's operators); traces, eigenvalues and Q-BERT statistics are computed from it densely."""

import math

import numpy as np
import pytest
import torch
from reference import hessian
from torch import nn

from conftest import fit
import hesskit as hk
from hesskit.quant.fake import quantize_model
from hesskit.quant.sensitivity import (
    PairInteractions,
    pair_interactions,
    rank_correlation,
    sensitivities,
)


def tiny_problem(seed: int = 0, n: int = 24):
    """A 4-5-4-3 tanh MLP in float64 (weights of 20, 20 and 12 entries), briefly trained so that
    the Hessian blocks are those of a model near (not at) a minimum, and ragged batches."""
    torch.manual_seed(seed)
    x, y = hk.data.classification(n=n, dim=4, num_classes=3, seed=seed)
    x = x.double()
    model = fit(hk.models.MLP(4, (5, 4), 3, activation="tanh").double(), x, y)
    return model, nn.CrossEntropyLoss(), x, y


@pytest.fixture(scope="module")
def problem():
    return tiny_problem()


LAYERS = ["1", "3", "5"]


def dense_full(model, criterion, batches):
    """The dense Hessian over all three weights (in layer order) and each block's slice."""
    names = [f"{n}.weight" for n in LAYERS]
    H = hessian(model, names, batches, criterion)
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    bounds = np.cumsum([0] + sizes)
    return H, {layer: slice(int(a), int(b)) for layer, a, b in zip(LAYERS, bounds[:-1], bounds[1:])}


def state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()])


def assert_unchanged(model, before):
    sd, training, flags, grads = before
    assert model.training == training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(g is None for g in grads) and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_joint_hutchinson_traces_match_the_dense_blocks(problem):
    model, criterion, x, y = problem
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]  # ragged: weighted by batch size
    H, blocks = dense_full(model, criterion, batches)
    m = 400
    s = sensitivities(model, criterion, batches, "trace", num_matvecs=m, seed=3)
    assert s.metric == "trace" and list(s) == LAYERS and s.num_matvecs == m and s.seed == 3
    for layer, sl in blocks.items():
        Hii = H[sl, sl]
        n = Hii.shape[0]
        assert s.num_params[layer] == n
        exact = torch.trace(Hii).item() / n
        # per-probe variance of z_i^T (H z)_i for Rademacher z (hk.trace's docstring, blocks=)
        others = torch.cat([H[sl, :sl.start], H[sl, sl.stop:]], dim=1)
        var = (2 * (Hii**2).sum() - 2 * (torch.diagonal(Hii) ** 2).sum() + (others**2).sum()).item() / n**2
        sd = math.sqrt(var / m)
        assert abs(s[layer] - exact) < 4 * sd, (layer, s[layer], exact, sd)
        assert 0.75 < s.stderr[layer] / sd < 1.25  # the reported standard error is the true one
        assert s.curvature[layer] == s[layer] and len(s.samples[layer]) == m
    # one probe over all layers: the per-layer forms add up to hk.trace's Hutchinson on the whole block
    op = hk.HessianOperator(model, criterion, batches, params=[f"{n}.weight" for n in LAYERS])
    total = hk.trace(op, m, method="hutchinson", seed=3)
    assert sum(s[k] * s.num_params[k] for k in LAYERS) == pytest.approx(total.value, rel=1e-10)


def test_per_layer_trace_methods(problem):
    model, criterion, x, y = problem
    H, blocks = dense_full(model, criterion, [(x, y)])
    # Hutch++ with a sketch as large as the block (20 = 60 // 3) is exact
    s = sensitivities(model, criterion, (x, y), "trace", num_matvecs=60, method="hutch++", seed=0)
    for layer, sl in blocks.items():
        assert s[layer] == pytest.approx(torch.trace(H[sl, sl]).item() / (sl.stop - sl.start), rel=1e-9, abs=1e-12)
    assert 0 < s.num_matvecs <= 3 * 60  # hk.trace's products, summed over the layers
    h = sensitivities(model, criterion, (x, y), "trace", num_matvecs=200, method="hutchinson", seed=1)
    for layer, sl in blocks.items():
        exact = torch.trace(H[sl, sl]).item() / (sl.stop - sl.start)
        assert abs(h[layer] - exact) < 5 * h.stderr[layer]


@pytest.mark.parametrize("which", ["magnitude", "largest"])
def test_top_eigenvalue_per_layer(problem, which):
    model, criterion, x, y = problem
    H, blocks = dense_full(model, criterion, [(x, y)])
    s = sensitivities(model, criterion, (x, y), "eigenvalue", which=which, tol=1e-10, seed=0)
    for layer, sl in blocks.items():
        eig = torch.linalg.eigvalsh(H[sl, sl])
        top = eig[eig.abs().argmax()] if which == "magnitude" else eig[-1]
        n = sl.stop - sl.start
        assert s[layer] == pytest.approx(top.item() / n, rel=1e-7)  # HAWQ: lambda_max / n_i
        assert s.curvature[layer] == pytest.approx(top.item(), rel=1e-7)  # Omega uses lambda itself
        assert s.residuals[layer] < 1e-8
        assert math.isnan(s.stderr[layer])
    assert s.num_matvecs > 0


def test_qbert_statistic_over_disjoint_subsets(problem):
    model, criterion, x, y = problem
    parts = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    from_list = sensitivities(model, criterion, parts, "qbert", num_subsets=3, tol=1e-10)
    from_batch = sensitivities(model, criterion, (x, y), "qbert", num_subsets=3, tol=1e-10)  # 24 = 3 x 8
    for layer in LAYERS:
        name = f"{layer}.weight"
        lams = []
        for part in parts:
            eig = torch.linalg.eigvalsh(hessian(model, [name], [part], criterion))
            lams.append(eig[eig.abs().argmax()].item())
        lams = np.array(lams)
        expected = abs(lams.mean()) + lams.std(ddof=1)
        np.testing.assert_allclose(from_list.samples[layer], lams, rtol=1e-7)
        assert from_list[layer] == pytest.approx(expected, rel=1e-7)
        assert from_batch[layer] == pytest.approx(expected, rel=1e-7)
        assert from_list.curvature[layer] == from_list[layer]


def test_measured_loss_change_is_the_direct_computation(problem):
    model, criterion, x, y = problem
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    before = state(model)
    s = sensitivities(model, criterion, batches, "measured", bits=(3, 2), granularity="channel")
    assert_unchanged(model, before)
    with torch.no_grad():
        base = criterion(model(x), y).item()
        for layer in LAYERS:
            for b in (2, 3):
                q = quantize_model(model, {layer: b}, granularity="channel")
                assert s.table[layer][b] == pytest.approx(criterion(q(x), y).item() - base, abs=1e-12)
            assert s[layer] == s.table[layer][2]  # the values are those of the smallest width
    assert s.bits == (2, 3) and s.baseline_loss == pytest.approx(base, abs=1e-13)
    single = sensitivities(model, criterion, (x, y), "measured", bits=4)
    q = quantize_model(model, {"3": 4})
    with torch.no_grad():
        assert single["3"] == pytest.approx(criterion(q(x), y).item() - base, abs=1e-12)
    assert single.bits == 4 and single.curvature == {}


def test_pair_interactions_are_joint_minus_singles(problem):
    model, criterion, x, y = problem
    before = state(model)
    p = pair_interactions(model, criterion, (x, y), (2, 4))
    assert_unchanged(model, before)
    assert isinstance(p, PairInteractions) and p.layers == LAYERS and p.choices == (2, 4)
    assert p.singles.shape == (3, 2) and p.terms.shape == (2, 2, 2)
    assert p.num_evaluations == 1 + 3 * 2 + 2 * 4
    with torch.no_grad():
        loss = lambda bits: criterion(quantize_model(model, bits)(x), y).item() - criterion(model(x), y).item()
        for i in range(2):
            for a, ba in enumerate((2, 4)):
                for c, bc in enumerate((2, 4)):
                    joint = loss({LAYERS[i]: ba, LAYERS[i + 1]: bc})
                    expected = joint - loss({LAYERS[i]: ba}) - loss({LAYERS[i + 1]: bc})
                    assert p.terms[i, a, c] == pytest.approx(expected, abs=1e-12)


def test_subset_of_layers_and_no_mutation(problem):
    model, criterion, x, y = problem
    model.train()  # a plain MLP may be in train mode (no BatchNorm, no dropout)
    before = state(model)
    for metric in ("trace", "eigenvalue", "qbert", "measured"):
        s = sensitivities(model, criterion, (x, y), metric, bits=2, layers=["5", "1"], num_matvecs=10)
        assert list(s) == ["1", "5"]  # model order
        assert_unchanged(model, before)
    model.eval()


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert rank_correlation({"a": 1.0, "b": 5.0, "c": 2.0}, {"c": 0.2, "a": 0.1, "b": 9.0}) == pytest.approx(1.0)
    assert rank_correlation(np.arange(5.0), -np.arange(5.0) ** 3) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same layers"):
        rank_correlation({"a": 1, "b": 2}, {"a": 1, "c": 2})
    with pytest.raises(ValueError, match="same length"):
        rank_correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        rank_correlation([1], [2])
    with pytest.raises(TypeError, match="mappings"):
        rank_correlation({"a": 1}, [1])


def test_bad_inputs(problem):
    model, criterion, x, y = problem
    with pytest.raises(ValueError, match="metric"):
        sensitivities(model, criterion, (x, y), "hessian")
    with pytest.raises(ValueError, match="bits: metric='measured'"):
        sensitivities(model, criterion, (x, y), "measured")
    with pytest.raises(ValueError, match="bits"):
        sensitivities(model, criterion, (x, y), "measured", bits=0)
    with pytest.raises(ValueError, match="bits"):
        sensitivities(model, criterion, (x, y), "measured", bits=[])
    with pytest.raises(ValueError, match="num_subsets"):
        sensitivities(model, criterion, (x, y), "qbert", num_subsets=1)
    with pytest.raises(ValueError, match="num_subsets"):
        sensitivities(model, criterion, [(x, y), (x, y)], "qbert", num_subsets=3)
    with pytest.raises(ValueError, match="num_matvecs"):
        sensitivities(model, criterion, (x, y), "trace", num_matvecs=0)
    with pytest.raises(ValueError, match="method"):
        sensitivities(model, criterion, (x, y), "trace", method="exact")
    with pytest.raises(ValueError, match="which"):
        sensitivities(model, criterion, (x, y), "eigenvalue", which="smallest")
    with pytest.raises(ValueError, match="layers"):
        sensitivities(model, criterion, (x, y), "trace", layers=["0"])
    with pytest.raises(ValueError, match="data"):
        sensitivities(model, criterion, [], "trace")
    with pytest.raises(ValueError, match="data"):
        sensitivities(model, criterion, (x[:0], y[:0]), "measured", bits=2)
    with pytest.raises(ValueError, match="mode"):
        sensitivities(model, criterion, (x, y), "trace", mode="train")
    with pytest.raises(TypeError, match="model"):
        sensitivities("model", criterion, (x, y), "trace")
    with pytest.raises(ValueError, match="choices"):
        pair_interactions(model, criterion, (x, y), ())
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double().train()
    with pytest.raises(ValueError, match="mode"):
        sensitivities(dropout, criterion, (x, y), "measured", bits=2)
