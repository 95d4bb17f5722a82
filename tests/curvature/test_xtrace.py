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


def _xtrace(A: torch.Tensor, W: torch.Tensor) -> tuple[float, torch.Tensor]:
    """XTrace and XDiag by their definition on the probes W: the means of the leave-one-out estimates."""
    traces, diagonals = _leave_one_out(A, W)
    return float(traces.mean()), diagonals.mean(dim=1)


def _jackknife(values: list) -> torch.Tensor:
    v = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in values])
    g = len(v)
    return ((g - 1) / g * ((v - v.mean(dim=0)) ** 2).sum(dim=0)).sqrt()


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
    # the standard error: the delete-one jackknife (m/2 <= 50 groups), each replicate XTrace by its
    # definition on the other probes
    s = m // 2
    without = [_xtrace(A, W[:, [j for j in range(s) if j != i]]) for i in range(s)]
    assert abs(result.stderr - _jackknife([t for t, _ in without]).item()) < 1e-10 * abs(traces).max()
    diag = hk.diagonal(A, m, method="xdiag", distribution=distribution, seed=3)
    assert diag.num_matvecs == m and diag.method == "xdiag"
    torch.testing.assert_close(diag.value, diagonals.mean(dim=1), rtol=0, atol=1e-10)
    groups = torch.arange(s).chunk(min(s, 10))  # XDiag's jackknife: 10 groups of probes at most
    reps = [_xtrace(A, W[:, [j for j in range(s) if j not in g.tolist()]])[1] for g in groups]
    torch.testing.assert_close(diag.stderr, _jackknife(reps), rtol=0, atol=1e-10)


@pytest.mark.parametrize("m", [5, 11])
def test_an_odd_budget_spends_its_last_product_on_a_deflated_probe(m):
    A = random_symmetric(30, seed=1, decay=0.9)
    _, gen = make_generator(4)
    W = probes(30, m // 2, "rademacher", gen, Counted(A))
    z = probes(30, 1, "rademacher", gen, Counted(A))[:, 0]  # drawn after the pairs' probes
    traces, diagonals = _leave_one_out(A, W)
    Q = torch.linalg.qr(A @ W).Q
    r = z - Q @ (Q.T @ z)
    extra_trace = (torch.trace(Q.T @ A @ Q) + r @ A @ r).item()  # Hutch++ with the whole sketch
    extra_diag = torch.diag(Q @ Q.T @ A) + z * ((A - Q @ Q.T @ A) @ z)
    result = hk.trace(A, m, seed=4)  # the default, XTrace
    assert result.num_matvecs == m and result.method == "xtrace"
    assert abs(result.value - np.append(traces, extra_trace).mean()) < 1e-10 * abs(traces).max()
    diag = hk.diagonal(A, m, seed=4)
    assert diag.num_matvecs == m and diag.method == "xdiag"
    torch.testing.assert_close(diag.value, torch.cat([diagonals, extra_diag[:, None]], 1).mean(dim=1), rtol=0,
                               atol=1e-10)


def test_a_budget_of_n_or_more_gives_the_exact_answer_from_n_products():
    A = random_symmetric(12, seed=2)
    for m in (12, 13, 40):
        result = hk.trace(A, m, seed=0)
        assert result.method == "exact" and result.num_matvecs == 12 and result.stderr == 0
        assert abs(result.value - A.trace().item()) < 1e-12 * A.abs().max().item()
        assert result.confidence_interval() == (result.value, result.value)
        diag = hk.diagonal(A, m, seed=0)
        assert diag.method == "exact" and diag.num_matvecs == 12 and (diag.stderr == 0).all()
        torch.testing.assert_close(diag.value, A.diag(), rtol=0, atol=1e-12)
    tiny = random_symmetric(3, seed=0)  # below XTrace's 4 products, n is still exact
    assert abs(hk.trace(tiny, 3).value - tiny.trace().item()) < 1e-12


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
    A = random_symmetric(70, seed=1, decay=decay)  # n > m: with m >= n the trace is computed exactly
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


def _spectra(n: int = 80) -> dict[str, torch.Tensor]:
    """Flat indefinite, flat positive, decaying (spiked) and low-rank-plus-noise spectra."""
    g = torch.Generator().manual_seed(7)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g)).Q
    i = torch.arange(1, n + 1, dtype=torch.float64)
    eig = {"flat indefinite": torch.linspace(-0.35, 0.6, n, dtype=torch.float64),
           "flat positive": 1 + 0.1 * torch.rand(n, dtype=torch.float64, generator=g),
           "spiked": 10 * i**-1.5,
           "low rank + noise": torch.cat([5 * torch.rand(8, dtype=torch.float64, generator=g),
                                          0.01 * torch.rand(n - 8, dtype=torch.float64, generator=g)])}
    return {k: (Q * e) @ Q.T for k, e in eig.items()}


@pytest.mark.parametrize("m", [10, 31, 60])
def test_the_jackknife_standard_error_is_honest(m):
    """The leave-one-out estimates share probes, so their own spread understated the error (the
    paper's estimate: 0.6-0.9 of the true spread, measured on these matrices). The jackknife is
    conservative for a function of independent probes (Efron & Stein 1981): its mean square is at
    least the variance of the estimate from one group fewer. Measured ratios to the true spread:
    1.1-2.3 (trace), medians over entries 1.1-2.2 (diagonal); coverage 0.84-1.0 (0.84-0.90 at 10
    products: 4 degrees of freedom). Over 300 seeds the RMS of the standard errors has a
    relative sd of a few % and the true spread about 4%, so the bounds 0.9 and 3 are wide margins;
    coverage of +-1.96 stderr over 300 seeds has a binomial sd of 1.6%."""
    seeds = 300
    for name, A in _spectra().items():
        runs = [hk.trace(A, m, seed=s) for s in range(seeds)]
        err = np.array([r.value for r in runs]) - A.trace().item()
        se = np.array([r.stderr for r in runs])
        ratio = np.sqrt((se**2).mean() / (err**2).mean())
        assert 0.9 < ratio < 3, (name, ratio)
        assert (np.abs(err) <= 1.96 * se).mean() >= (0.83 if m == 10 else 0.9), name  # t_4 at 1.96: 0.88
    for name, A in _spectra(64).items():
        runs = [hk.diagonal(A, m, seed=s) for s in range(seeds // 2)]
        err = torch.stack([r.value for r in runs]) - A.diag()
        se = torch.stack([r.stderr for r in runs])
        ratio = ((se**2).mean(dim=0) / (err**2).mean(dim=0)).sqrt().median().item()  # per entry, the median
        assert 0.9 < ratio < 3, (name, ratio)
        assert (err.abs() <= 1.96 * se).double().mean() >= (0.83 if m == 10 else 0.9), name


def test_xdiag_is_unbiased_and_beats_hutchinson_on_a_decaying_spectrum():
    A = random_symmetric(70, seed=4, decay=0.8)  # n > m: with m >= n the diagonal is computed exactly
    runs = [hk.diagonal(A, 60, method="xdiag", seed=s) for s in range(TRIALS)]
    V = torch.stack([r.value for r in runs])
    # per entry, the mean over TRIALS within 4.5 of its standard errors (70 entries: P(any) ~ 5e-4)
    z = (V.mean(dim=0) - A.diag()) / (V.std(dim=0) / math.sqrt(TRIALS))
    assert z.abs().max() < 4.5
    hutch = torch.stack([hk.diagonal(A, 60, method="hutchinson", seed=s).value for s in range(TRIALS)])
    assert ((V - A.diag()) ** 2).mean() < 0.1 * ((hutch - A.diag()) ** 2).mean()


@pytest.mark.parametrize("kind", list(KINDS))
def test_xtrace_and_xdiag_on_curvature_operators(kind):
    case = make_case("mlp")
    op = KINDS[kind](case.model, case.criterion, case.batches)
    dense = op.dense()
    n = dense.shape[0]
    exact = hk.trace(op, n, seed=0)  # n products: the unit vectors
    assert exact.method == "exact" and exact.num_matvecs == n
    assert abs(exact.value - dense.trace().item()) < 1e-8 * dense.abs().max().item()
    diag = hk.diagonal(op, n, seed=0)
    torch.testing.assert_close(diag.value, dense.diag(), rtol=0, atol=1e-8 * dense.abs().max().item())
    assert diag.params == tuple(case.names)
    # a sketch of half the rows: unbiased, and the error within 5 of its (conservative) standard error
    for m in (n // 2, n // 2 + 1):
        estimate = hk.trace(op, m, seed=1)
        assert estimate.method == "xtrace" and estimate.num_matvecs == m
        assert abs(estimate.value - dense.trace().item()) <= 5 * estimate.stderr


def test_bad_budgets_are_refused():
    A = random_symmetric(10, seed=0)
    for bad in (1, 3):
        with pytest.raises(ValueError, match="num_matvecs: XTrace needs at least 4 products"):
            hk.trace(A, bad)
        with pytest.raises(ValueError, match="num_matvecs: XDiag needs at least 4 products"):
            hk.diagonal(A, bad)
        assert hk.trace(A, bad, method="hutchinson", seed=0).num_matvecs == bad  # as the message says
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="num_matvecs"):
            hk.trace(A, bad)
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
    exact_all = hk.trace(op, H.shape[0], seed=0, blocks="parameter")  # n products: exact
    assert exact_all.method == "exact" and exact_all.num_matvecs == H.shape[0]
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
        hk.trace(A, 9, method="hutch++", blocks={"a": slice(0, 5)})
    with pytest.raises(ValueError, match="blocks: 'module' needs a curvature operator"):
        hk.trace(A, 30, method="hutchinson", blocks="module")
    with pytest.raises(ValueError, match="outside"):
        hk.trace(A, 30, method="hutchinson", blocks={"a": [3, 10]})
    case = make_case("mlp")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    with pytest.raises(ValueError, match="not parameters of the operator"):
        hk.trace(op, 30, method="hutchinson", blocks={"a": ["nope.weight"]})


def test_xtrace_block_traces_are_unbiased_with_an_honest_standard_error():
    """Per-block XTrace: each block's estimate is the block sum of XDiag's, and its standard error
    the jackknife's over the block sums of XDiag's replicates. Over 300 seeds: unbiased (4 sd) and
    the RMS standard error at least 0.9 of the true spread (conservative, as the whole trace's)."""
    A = _spectra(80)["spiked"] + _spectra(80)["flat indefinite"]
    blocks = {"first": slice(0, 30), "middle": list(range(30, 50)), "last": torch.arange(50, 80)}
    runs = [hk.trace(A, 30, seed=s, blocks=blocks) for s in range(300)]
    assert runs[0].method == "xtrace" and runs[0].num_matvecs == 30 and runs[0].num_samples == 15
    for name, idx in (("first", range(0, 30)), ("middle", range(30, 50)), ("last", range(50, 80))):
        truth = A.diag()[list(idx)].sum().item()
        values = np.array([r[name] for r in runs])
        se = np.array([r.stderr[name] for r in runs])
        assert abs(values.mean() - truth) <= 4 * values.std() / math.sqrt(len(runs))
        assert 0.9 < np.sqrt((se**2).mean() / ((values - truth) ** 2).mean()) < 3
        assert all(abs(r[name] - r.samples[name].mean()) < 1e-10 for r in runs[:5])  # the mean of its samples
    # the same products as XDiag's: the blocks add up to the sum of its diagonal (a trace estimate
    # as unbiased as XTrace's, deflated on one side only)
    whole = [hk.diagonal(A, 30, seed=s).value.sum().item() for s in range(5)]
    for w, r in zip(whole, runs):
        assert abs(sum(r.values.values()) - w) < 1e-10 * abs(w) + 1e-10


def test_diagonal_blocks_label_the_entries_by_parameter():
    case = make_case("cnn")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    whole = hk.diagonal(op, 40, seed=3)
    result = hk.diagonal(op, 40, seed=3, blocks="parameter")
    torch.testing.assert_close(result.value, whole.value, rtol=0, atol=0)  # labels only: the same estimate
    params = dict(case.model.named_parameters())
    start = 0
    for name in case.names:
        value, stderr = result.block(name)
        assert value.shape == params[name].shape and stderr.shape == params[name].shape
        size = params[name].numel()
        torch.testing.assert_close(value.reshape(-1), whole.value[start : start + size], rtol=0, atol=0)
        start += size
    module = hk.diagonal(op, 40, seed=3, blocks="module")
    first = next(iter(module.blocks))
    assert module.block(first)[0].dim() == 1  # a module's weight and bias together: one flat block
    with pytest.raises(KeyError, match="not one of"):
        result.block("nope")
    with pytest.raises(ValueError, match="no blocks"):
        whole.block(case.names[0])
