"""XTrace and XDiag (Epperly, Tropp & Webber 2024) against their definition, the exact answer and
the other estimators. Statistical bounds are derived where they are used (TRIALS fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import KINDS, make_case, random_symmetric

import hesskit as hk
from hesskit.curvature.probes import Counted, make_generator, probes

TRIALS = 400


def _leave_one_out(A: torch.Tensor, W: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """The definition, term by term: for each probe i, P_i projects onto range(A W without column i);
    the trace estimate tr(P_i A) + r^T A r with r = (I - P_i) w_i, and the diagonal estimate
    diag(P_i A) + w_i * ((I - P_i) A w_i)."""
    Y, s = A @ W, W.shape[1]
    traces, diagonals = [], []
    for i in range(s):
        Qi = torch.linalg.qr(Y[:, [j for j in range(s) if j != i]]).Q
        P, w = Qi @ Qi.T, W[:, i]
        r = w - P @ w
        traces.append((torch.trace(P @ A) + r @ A @ r).item())
        diagonals.append(torch.diag(P @ A) + w * ((A - P @ A) @ w))
    return np.array(traces), torch.stack(diagonals, dim=1)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("m", [4, 10, 24])
def test_xtrace_and_xdiag_equal_their_definition(m, distribution):
    A = random_symmetric(30, seed=1, decay=0.9)
    _, gen = make_generator(3)
    W = probes(30, m // 2, distribution, gen, Counted(A))  # the probes the estimators draw from seed 3
    traces, diagonals = _leave_one_out(A, W)
    result = hk.trace(A, m, method="xtrace", distribution=distribution, seed=3)
    assert result.num_matvecs == m and result.num_samples == m // 2 and result.method == "xtrace"
    assert abs(result.value - traces.mean()) < 1e-10 * abs(traces).max()
    assert abs(result.stderr - traces.std(ddof=1) / math.sqrt(m // 2)) < 1e-10 * abs(traces).max()
    diag = hk.diagonal(A, m, method="xdiag", distribution=distribution, seed=3)
    assert diag.num_matvecs == m and diag.method == "xdiag"
    torch.testing.assert_close(diag.value, diagonals.mean(dim=1), rtol=0, atol=1e-10)
    torch.testing.assert_close(diag.stderr, diagonals.std(dim=1) / math.sqrt(m // 2), rtol=0, atol=1e-10)


def test_exact_when_the_operator_has_lower_rank_than_the_sketch():
    B = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    L = B @ B.T - 2 * torch.outer(B[:, 0], B[:, 0])  # rank 3, indefinite
    result = hk.trace(L, 10, method="xtrace", seed=0)
    assert abs(result.value - L.trace().item()) < 1e-10 * L.abs().max().item() and result.stderr == 0
    diag = hk.diagonal(L, 10, method="xdiag", seed=0)
    torch.testing.assert_close(diag.value, L.diag(), rtol=0, atol=1e-10)
    assert diag.stderr.abs().max() == 0


@pytest.mark.parametrize("decay, m", [(0.97, 30), (0.8, 60)])
def test_xtrace_is_unbiased_and_at_least_as_good_as_hutchpp(decay, m):
    A = random_symmetric(40, seed=1, decay=decay)
    truth = A.trace().item()
    runs = {method: [hk.trace(A, m, method=method, seed=s) for s in range(TRIALS)]
            for method in ("xtrace", "hutch++", "hutchinson")}
    values = {k: np.array([r.value for r in v]) for k, v in runs.items()}
    x = values["xtrace"]
    # the mean of TRIALS independent estimates: within 4 of its standard errors
    assert abs(x.mean() - truth) <= 4 * x.std() / math.sqrt(TRIALS)
    rmse = {k: float(np.sqrt(np.mean((v - truth) ** 2))) for k, v in values.items()}
    # an RMSE over 400 trials has a relative sd of about 1/sqrt(2 * 400) = 3.5% (more with heavy
    # tails): the margins below are several of those
    assert rmse["xtrace"] < 1.05 * rmse["hutch++"]
    if decay == 0.8:  # decaying: far better than Hutchinson, and than Hutch++ too
        assert rmse["xtrace"] < 0.3 * rmse["hutch++"] and rmse["xtrace"] < 0.01 * rmse["hutchinson"]
    else:  # nearly flat: no better than Hutchinson (this is its best case), but not far behind
        assert rmse["xtrace"] < 1.5 * rmse["hutchinson"]
    # The standard error is the paper's (the spread of the s leave-one-out estimates over sqrt(s)).
    # The estimates share s - 2 of their sketch columns and are positively correlated, so it is
    # optimistic: measured 0.66 of the true spread on the flat matrix, 0.87 on the decaying one.
    ratio = np.mean([r.stderr for r in runs["xtrace"]]) / x.std()
    assert (0.55 < ratio < 0.8) if decay == 0.97 else (0.75 < ratio < 1.0)


def test_xdiag_is_unbiased_and_beats_hutchinson_on_a_decaying_spectrum():
    A = random_symmetric(30, seed=4, decay=0.8)
    runs = [hk.diagonal(A, 60, method="xdiag", seed=s) for s in range(TRIALS)]
    V = torch.stack([r.value for r in runs])
    # per entry, the mean over TRIALS within 4.5 of its standard errors (30 entries: P(any) ~ 2e-4)
    z = (V.mean(dim=0) - A.diag()) / (V.std(dim=0) / math.sqrt(TRIALS))
    assert z.abs().max() < 4.5
    hutch = torch.stack([hk.diagonal(A, 60, seed=s).value for s in range(TRIALS)])
    assert ((V - A.diag()) ** 2).mean() < 0.1 * ((hutch - A.diag()) ** 2).mean()


@pytest.mark.parametrize("kind", list(KINDS))
def test_xtrace_and_xdiag_on_curvature_operators(kind):
    case = make_case("mlp")
    op = KINDS[kind](case.model, case.criterion, case.batches)
    dense = op.dense()
    n = dense.shape[0]
    exact = hk.trace(op, 2 * n, method="xtrace", seed=0)  # s = n probes: the sketch spans everything
    assert abs(exact.value - dense.trace().item()) < 1e-8 * dense.abs().max().item()
    diag = hk.diagonal(op, 2 * n, method="xdiag", seed=0)
    torch.testing.assert_close(diag.value, dense.diag(), rtol=0, atol=1e-8 * dense.abs().max().item())
    assert diag.params == tuple(case.names)


def test_bad_budgets_are_refused():
    A = random_symmetric(10, seed=0)
    for bad in (5, 3, 22):
        with pytest.raises(ValueError, match="num_matvecs"):
            hk.trace(A, bad, method="xtrace")
        with pytest.raises(ValueError, match="num_matvecs"):
            hk.diagonal(A, bad, method="xdiag")
    with pytest.raises(ValueError, match="method"):
        hk.diagonal(A, 10, method="xtrace")


# ------------------------------------------------------------------- per-block traces
def test_block_traces_share_their_probes_and_add_up():
    case = make_case("cnn")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    H = op.dense()
    whole = hk.trace(op, 40, method="hutchinson", seed=2)
    per_layer = hk.trace(op, 40, method="hutchinson", seed=2, blocks="module")
    assert per_layer.num_matvecs == 40 and per_layer.num_samples == 40  # one product per probe for all blocks
    assert abs(sum(per_layer.values.values()) - whole.value) < 1e-10 * abs(whole.value)  # the same probes
    assert list(per_layer) == list(hk.layer_groups(op.param_names)) and sum(per_layer.sizes.values()) == H.shape[0]
    start = 0
    for block, size in per_layer.sizes.items():
        exact = torch.trace(H[start : start + size, start : start + size]).item()
        assert abs(per_layer[block] - exact) <= 5 * per_layer.stderr[block] + 1e-12  # 5 sd: ~6e-7 per block
        assert len(per_layer.samples[block]) == 40
        start += size
    per_param = hk.trace(op, 40, method="xtrace", seed=2, blocks="parameter")
    assert per_param.params == tuple(case.names) and per_param.num_samples == 20
    exact_all = hk.trace(op, 2 * H.shape[0], method="xtrace", seed=0, blocks="parameter")  # spans: exact
    start = 0
    for block, size in exact_all.sizes.items():
        exact = torch.trace(H[start : start + size, start : start + size]).item()
        assert abs(exact_all[block] - exact) < 1e-8 * H.abs().max().item() and exact_all.stderr[block] == 0
        start += size


def test_block_traces_of_a_matrix_with_row_indices_and_the_variance_of_each_block():
    A = random_symmetric(24, seed=5, decay=0.9)
    blocks = {"first": slice(0, 10), "rest": list(range(10, 24))}
    runs = [hk.trace(A, 30, method="hutchinson", seed=s, blocks=blocks) for s in range(TRIALS)]
    for name, idx in (("first", torch.arange(10)), ("rest", torch.arange(10, 24))):
        values = np.array([r[name] for r in runs])
        Abb = A[idx][:, idx]
        others = A[idx][:, [j for j in range(24) if j not in idx.tolist()]]
        # per probe: Var = 2 ||A_bb||_F^2 - 2 sum diag(A_bb)^2 + ||A_b,rest||_F^2 (Rademacher)
        var = (2 * (Abb**2).sum() - 2 * (Abb.diag() ** 2).sum() + (others**2).sum()).item() / 30
        assert abs(values.mean() - torch.trace(Abb).item()) <= 4 * math.sqrt(var / TRIALS)
        assert abs(values.var() / var - 1) < 0.3  # the sample variance of 400 runs: relative sd ~7%


def test_block_traces_refuse_what_they_cannot_do():
    A = random_symmetric(10, seed=0)
    with pytest.raises(ValueError, match="method: per-block traces"):
        hk.trace(A, 30, blocks={"a": slice(0, 5)})  # Hutch++, the default
    with pytest.raises(ValueError, match="blocks: 'module' needs a curvature operator"):
        hk.trace(A, 30, method="hutchinson", blocks="module")
    with pytest.raises(ValueError, match="outside"):
        hk.trace(A, 30, method="hutchinson", blocks={"a": [3, 10]})
    case = make_case("mlp")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    with pytest.raises(ValueError, match="not parameters of the operator"):
        hk.trace(op, 30, method="hutchinson", blocks={"a": ["nope.weight"]})
