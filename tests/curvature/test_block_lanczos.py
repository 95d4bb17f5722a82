"""Block Lanczos finds every copy of a repeated eigenvalue, where single-vector Lanczos (whose
Krylov space holds one direction per eigenspace) finds one: exact tests on matrices with known
multiplicities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesskit as hk


def _with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = len(eigenvalues)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))).Q
    return (Q * eigenvalues) @ Q.T


def _check_pairs(result, A, atol):
    V = result.vectors
    torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1], dtype=V.dtype), rtol=0, atol=1e-10)
    true_residuals = (A @ V - V * result.values).norm(dim=0)
    assert (true_residuals <= result.residuals + atol).all()  # the reported residuals are the true ones


@pytest.mark.parametrize("which, sign", [("largest", 1.0), ("smallest", -1.0)])
def test_a_five_fold_eigenvalue_is_found_five_times(which, sign):
    values = torch.cat([torch.full((5,), 3.0), torch.linspace(-1, 2, 55)]).double() * sign
    A = _with_spectrum(values)
    result = hk.eigenvalues(A, k=6, which=which, tol=1e-10, block_size=5, seed=0)
    expected = torch.tensor([3.0] * 5 + [2.0], dtype=torch.float64) * sign
    torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-8)
    assert result.converged.all() and result.method == "block lanczos (block size 5)"
    _check_pairs(result, A, 1e-9)


def test_single_vector_lanczos_cannot_see_multiplicity_so_smallest_defaults_to_blocks():
    values = torch.cat([torch.zeros(4), torch.linspace(1, 5, 56)]).double()
    A = _with_spectrum(values, seed=1)
    blocks = hk.eigenvalues(A, k=4, which="smallest", tol=1e-10, seed=0)  # block size k by default
    assert blocks.method == "block lanczos (block size 4)"
    torch.testing.assert_close(blocks.values, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-8)
    single = hk.eigenvalues(A, k=4, which="smallest", tol=1e-10, block_size=1, seed=0)
    assert (single.values > 0.5).sum() >= 1  # it skipped copies of 0 for the next distinct eigenvalues


def test_softmax_regression_hessian_has_a_repeated_zero():
    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    model = nn.Linear(4, 3).double()
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    # the loss is invariant to adding one vector to every class's weights and bias: a 5-fold zero
    exact = torch.linalg.eigvalsh(op.dense())
    assert (exact.abs() < 1e-12).sum() == 5
    result = hk.eigenvalues(op, k=2, which="smallest", tol=1e-8, seed=0)
    torch.testing.assert_close(result.values, exact[:2], rtol=0, atol=1e-9)  # two zeros, not 0 and the next one
    single = hk.eigenvalues(op, k=2, which="smallest", tol=1e-8, block_size=1, seed=0)
    assert abs(single.values[1] - exact[5]) < 1e-6  # the issue this fixes: 0, then the next distinct value


def test_rank_deficient_ggn_smallest_are_zeros():
    torch.manual_seed(0)
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    op = hk.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    G = op.dense()
    assert torch.linalg.matrix_rank(G) <= 3 * 2  # N (C - 1): far below n = 53
    result = hk.eigenvalues(op, k=3, which="smallest", tol=1e-8, seed=0)
    torch.testing.assert_close(result.values, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9 * G.abs().max())
    top = hk.eigenvalues(op, k=3, block_size=3, tol=1e-10, seed=0)
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(G).flip(0)[:3], rtol=1e-8, atol=0)
    _check_pairs(top, G, 1e-9)


def test_block_size_is_checked():
    A = _with_spectrum(torch.linspace(0, 1, 20).double())
    with pytest.raises(ValueError, match="block_size"):
        hk.eigenvalues(A, k=2, block_size=0)
    with pytest.raises(ValueError, match="basis_size"):
        hk.eigenvalues(A, k=2, block_size=4, basis_size=8)


# ---------------------------------------------------------------- the default: lanczos, a copy check, then blocks
def _true_residuals(result, A):
    return (A @ result.vectors - result.vectors * result.values).norm(dim=0)


@pytest.mark.parametrize("which, sign", [("largest", 1.0), ("magnitude", -1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_default_finds_every_copy_of_a_five_fold_eigenvalue(which, sign, seed):
    # diagonal: the copies are the coordinate axes e_0..e_4; a random start vector meets them in one direction
    A = torch.diag(torch.cat([torch.full((5,), 3.0 * sign), torch.linspace(-1, 2, 55)]).double())
    single = hk.eigenvalues(A, k=6, which=which, tol=1e-10, block_size=1, seed=seed)
    assert ((single.values - 3.0 * sign).abs() < 1e-6).sum() < 5  # what the check is for: copies missed
    result = hk.eigenvalues(A, k=6, which=which, tol=1e-10, seed=seed)
    exact = torch.linalg.eigvalsh(A)
    expected = exact[exact.abs().argsort(descending=True)][:6] if which == "magnitude" else exact.flip(0)[:6]
    torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-9)  # 3 (or -3) five times, then 2
    assert result.converged.all() and result.method.startswith("lanczos, then block lanczos (block size")
    _check_pairs(result, A, 1e-9)
    torch.testing.assert_close(result.residuals, _true_residuals(result, A), rtol=0, atol=1e-12)


def test_the_default_resolves_a_cluster_of_five_within_1e_4():
    f64 = dict(dtype=torch.float64)
    values = torch.cat([1 - 2.5e-5 * torch.arange(5, **f64), torch.tensor([0.5, 0.3], **f64),
                        0.02 * torch.randn(293, generator=torch.Generator().manual_seed(0), **f64)])
    A = _with_spectrum(values, seed=3)
    exact = torch.linalg.eigvalsh(A).flip(0)[:6]
    single = hk.eigenvalues(A, k=6, tol=1e-3, block_size=1, seed=0)
    assert (single.values - exact).abs().max() > 0.1  # single-vector Lanczos returns 0.5 among the top 6
    result = hk.eigenvalues(A, k=6, tol=1e-3, seed=0)
    # every returned value is within its residual bound tol * ||A|| of the exact one in the same place
    assert ((result.values - exact).abs() <= 1e-3 * exact[0]).all() and result.converged.all()
    assert "block lanczos" in result.method
    torch.testing.assert_close(result.residuals, _true_residuals(result, A), rtol=0, atol=1e-12)


def test_every_copy_in_a_block_diagonal_matrix_with_two_equal_blocks():
    f64 = dict(dtype=torch.float64)
    B = _with_spectrum(torch.cat([torch.tensor([1.0, 0.7, 0.5], **f64), 0.1 * torch.rand(37, **f64)]), seed=4)
    D = torch.block_diag(B, B)  # every eigenvalue of B twice (notebook 02's example)
    result = hk.eigenvalues(D, k=4, tol=1e-8, seed=0)
    torch.testing.assert_close(result.values, torch.tensor([1.0, 1.0, 0.7, 0.7], **f64), rtol=0, atol=1e-8)
    _check_pairs(result, D, 1e-9)


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_a_spread_spectrum_costs_the_single_vector_run_plus_the_check(tol):
    f64 = dict(dtype=torch.float64)
    bulk = 0.02 * torch.randn(193, generator=torch.Generator().manual_seed(1), **f64)
    values = torch.cat([0.7 ** torch.arange(7, **f64), bulk])
    A = _with_spectrum(values, seed=5)
    single = hk.eigenvalues(A, k=5, tol=tol, block_size=1, seed=0)
    result = hk.eigenvalues(A, k=5, tol=tol, seed=0)
    checked = int(result.method.split("(")[1].split()[0])
    assert result.method == f"lanczos, then a copy check ({checked} products) that found nothing more"
    assert result.num_matvecs == single.num_matvecs + checked and 2 <= checked <= 5  # same run, then the check
    assert (result.values - single.values).abs().max() <= tol  # the same values (the check's basis may refine them)
    exact = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert ((result.values - exact).abs() <= result.residuals + 1e-14).all() and result.converged.all()
    torch.testing.assert_close(result.residuals, _true_residuals(result, A), rtol=0, atol=1e-12)


def test_no_check_where_a_copy_cannot_change_the_answer_and_an_honest_method_where_it_cannot_run():
    A = _with_spectrum(torch.cat([torch.full((3,), 2.0), torch.linspace(0, 1, 57)]).double(), seed=6)
    assert hk.eigenvalues(A, k=1, tol=1e-8, seed=0).method == "lanczos"  # a copy of lambda_1 does not change it
    equal = hk.eigenvalues(A, k=2, tol=1e-8, seed=0)  # nor of 2 = lambda_1 = lambda_2
    assert equal.method == "lanczos (no copy check: the k values agree to tol)"
    single = hk.eigenvalues(A, k=4, tol=1e-8, block_size=1, seed=0)
    spent = hk.eigenvalues(A, k=4, tol=1e-8, max_matvecs=single.num_matvecs, seed=0)
    assert spent.method == "lanczos (copy check skipped: budget spent)" and spent.num_matvecs == single.num_matvecs
    tiny = hk.eigenvalues(A, k=4, tol=1e-8, basis_size=9, seed=0)
    assert tiny.method == "lanczos (copy check skipped: no room in the basis)"
    roomy = hk.eigenvalues(A, k=4, tol=1e-8, seed=0)
    torch.testing.assert_close(roomy.values, torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_check_repeats_after_block_lanczos_until_it_finds_nothing(seed):
    # a 5-fold top eigenvalue 0.1 above a dense bulk: one round of blocks can stop at 4 copies
    bulk = 0.9 - 0.5 * torch.rand(295, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    A = _with_spectrum(torch.cat([torch.ones(5, dtype=torch.float64), bulk]), seed=seed)
    result = hk.eigenvalues(A, k=6, tol=1e-3, seed=seed)
    exact = torch.linalg.eigvalsh(A).flip(0)[:6]
    assert ((result.values - exact).abs() <= 1e-3).all() and result.converged.all()  # five times 1, then 0.9
    torch.testing.assert_close(result.residuals, _true_residuals(result, A), rtol=0, atol=1e-12)


def test_the_smallest_of_a_rank_deficient_ggn_are_all_zeros_by_default():
    """A block of b sees at most b copies, so the default block for which="smallest" is min(k, 8):
    the 5 smallest of an MLP's GGN on 8 digits (rank <= 72 of n = 2,410) are five zeros (to tol),
    where blocks of 4 (the earlier default) return four and then a nonzero eigenvalue."""
    (x, y), _ = hk.data.digits(seed=0)
    torch.manual_seed(0)
    model = hk.models.MLP(hidden=(32,)).double()
    op = hk.GGNOperator(model, nn.CrossEntropyLoss(), (x[:8].double(), y[:8]))
    norm = hk.eigenvalues(op, k=1, seed=0).values[0].item()
    result = hk.eigenvalues(op, k=5, which="smallest", seed=0)  # tol 1e-3
    assert result.method == "block lanczos (block size 5)" and result.converged.all()
    assert (result.values.abs() <= 1e-3 * norm).all()
    fours = hk.eigenvalues(op, k=5, which="smallest", seed=0, block_size=4)
    assert fours.values[-1] > 1e-3 * norm  # what the test guards against
