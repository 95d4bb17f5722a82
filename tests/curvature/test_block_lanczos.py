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
