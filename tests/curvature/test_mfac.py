"""hk.MFACInverseOperator: F^{-1} x for F = damping*I + (1/m) sum g_i g_i^T over a ring buffer of m gradients,
checked against torch.linalg.solve of the dense damped empirical Fisher."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case
from torch import nn

import hesskit as hk


def dense_fisher(window: torch.Tensor, m: int, damping: float) -> torch.Tensor:
    """damping*I + (1/m) sum over the gradients in `window` (rows), with m fixed (missing rows are zero)."""
    d = window.shape[1]
    return damping * torch.eye(d, dtype=window.dtype) + window.T @ window / m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def gradients() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(13, 20, generator=gen, dtype=torch.float64) * torch.logspace(0, 1, 20, dtype=torch.float64)


@pytest.mark.parametrize("inserted", [3, 6, 13], ids=["filling", "full", "wrapped"])
def test_inverse_product_matches_dense_solve(gradients, inserted):
    m, damping = 6, 1e-3
    inv = hk.MFACInverseOperator(20, num_grads=m, damping=damping, dtype=torch.float64)
    for g in gradients[:inserted]:
        inv.update(g)
    window = gradients[max(0, inserted - m) : inserted]  # the ring buffer keeps the last m
    F = dense_fisher(window, m, damping)
    X = torch.randn(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel(inv @ X, torch.linalg.solve(F, X)) < 1e-6
    assert rel(inv.inverse_product(X[:, 0]), torch.linalg.solve(F, X[:, 0])) < 1e-6
    assert (inv @ X[:, 0]).shape == (20,)
    assert rel(inv.fisher_product(X), F @ X) < 1e-12
    assert rel(inv.inverse_diagonal(), torch.linalg.inv(F).diagonal()) < 1e-6
    assert rel(inv.dense(), torch.linalg.inv(F)) < 1e-6
    assert inv.num_filled == min(inserted, m) and inv.count == inserted


def test_empty_window_is_damping_inverse_and_update_and_apply_reuses_the_row(gradients):
    inv = hk.MFACInverseOperator(20, num_grads=4, damping=0.5, dtype=torch.float64)
    x = gradients[0]
    assert torch.allclose(inv @ x, x / 0.5)
    u = inv.update_and_apply(x)  # one gradient, m = 4: F = 0.5 I + g g^T / 4
    expected = x / (0.5 + x.dot(x) / 4)  # F g = (0.5 + |g|^2/4) g
    assert rel(u, expected) < 1e-12
    inv.reset()
    assert inv.count == 0 and torch.allclose(inv @ x, x / 0.5)


def test_float32_sanity(gradients):
    m, damping = 6, 1e-2
    inv = hk.MFACInverseOperator(20, num_grads=m, damping=damping, dtype=torch.float32)
    for g in gradients:
        inv.update(g.float())
    x = torch.randn(20, generator=torch.Generator().manual_seed(2))
    out = inv @ x
    assert out.dtype == torch.float32
    F = dense_fisher(gradients[-m:].float().double(), m, damping)
    assert rel(out.double(), torch.linalg.solve(F, x.double())) < 1e-3
    assert inv.factorization == "cholesky"


def test_update_and_apply_keeps_float32_accuracy_with_collinear_gradients():
    """Nearly collinear gradients and damping 1e-5: Woodbury's (g - G^T K^{-1} G g) / damping
    cancels in float32, while F^{-1} g = m G^T K^{-1} e_s for the gradient just inserted does not."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(20, 300, generator=gen) + 3 * torch.randn(1, 300, generator=gen)
    m, damping = 8, 1e-5
    inv = hk.MFACInverseOperator(300, num_grads=m, damping=damping, dtype=torch.float32)
    for g in G[:-1]:
        inv.update(g)
    u = inv.update_and_apply(G[-1])
    F = dense_fisher(G[-m:].double(), m, damping)
    assert rel(u.double(), torch.linalg.solve(F, G[-1].double())) < 1e-4


def test_valid_operator_for_estimators(gradients):
    m, damping = 6, 0.1
    inv = hk.MFACInverseOperator(20, num_grads=m, damping=damping, dtype=torch.float64)
    for g in gradients[:m]:
        inv.update(g)
    exact = torch.linalg.eigvalsh(torch.linalg.inv(dense_fisher(gradients[:m], m, damping)))
    result = hk.eigenvalues(inv, k=2, which="smallest", tol=1e-10, seed=0)
    assert torch.allclose(torch.as_tensor(result.values, dtype=torch.float64), exact[:2], rtol=1e-6)
    assert inv.shape == (20, 20) and inv.dtype == torch.float64 and inv.device == torch.device("cpu")
    assert abs(hk.trace(inv, num_matvecs=60, seed=0).value - exact.sum().item()) < 1e-6 * exact.sum().item()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=5, num_grads=0), "num_grads"),
        (dict(dim=5, num_grads=2.5), "num_grads"),
        (dict(dim=0), "dim"),
        (dict(dim=5, damping=0.0), "damping"),
        (dict(dim=5, damping=-1e-4), "damping"),
        (dict(dim=5, damping=float("nan")), "damping"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hk.MFACInverseOperator(**kwargs)


def test_bad_gradients_and_vectors_leave_the_window_unchanged():
    inv = hk.MFACInverseOperator(5, num_grads=3, damping=1e-3, dtype=torch.float64)
    inv.update(torch.ones(5, dtype=torch.float64))
    before = inv.grads.clone(), inv.gram.clone()
    with pytest.raises(ValueError, match="shape"):
        inv.update(torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        inv.update(torch.ones(5, 1))
    with pytest.raises(ValueError, match="nan"):
        inv.update(torch.tensor([1.0, float("nan"), 0, 0, 0]))
    with pytest.raises(TypeError):
        inv.update([1.0] * 5)
    assert inv.count == 1 and torch.equal(inv.grads, before[0]) and torch.equal(inv.gram, before[1])
    with pytest.raises(ValueError, match="shape"):
        inv @ torch.ones(4)
    with pytest.raises(ValueError, match="nan"):
        inv @ torch.full((5,), float("inf"))
    with pytest.raises(TypeError, match="dtype"):
        hk.MFACInverseOperator(5, dtype=torch.int64)


def test_from_model_per_sample_is_the_damped_empirical_fisher():
    case = make_case("mlp")  # float64 MLP, 23 samples in ragged batches
    model, criterion, batches = case.model, case.criterion, case.batches
    before = [p.detach().clone() for p in model.parameters()]
    damping = 1e-3
    inv = hk.MFACInverseOperator.from_model(model, criterion, batches, damping=damping)
    assert inv.num_grads == 23 and inv.count == 23
    eye = torch.eye(case.num_params, dtype=torch.float64)
    F = hk.EmpiricalFisherOperator(model, criterion, batches).dense() + damping * eye
    x = torch.randn(case.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert rel(inv @ x, torch.linalg.solve(F, x)) < 1e-6
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters()) and model.training

    # the first num_grads samples, in data order: sample 0's loss gradient comes first
    few = hk.MFACInverseOperator.from_model(model, criterion, batches, num_grads=12, damping=damping)
    x0, y0 = batches[0][0][:1], batches[0][1][:1]
    g0 = torch.autograd.grad(criterion(model(x0), y0), list(model.parameters()))
    assert torch.allclose(few.grads[0], torch.cat([g.reshape(-1) for g in g0]))
    assert few.num_grads == 12 and few.count == 12


def test_from_model_per_batch_and_errors():
    case = make_case("mlp")
    model, criterion, batches = case.model, case.criterion, case.batches
    inv = hk.MFACInverseOperator.from_model(model, criterion, batches, num_grads=2, per_sample=False)
    x, y = batches[1]
    g1 = torch.autograd.grad(criterion(model(x), y), list(model.parameters()))
    assert torch.allclose(inv.grads[1], torch.cat([g.reshape(-1) for g in g1]))
    with pytest.raises(ValueError, match="num_grads"):
        hk.MFACInverseOperator.from_model(model, criterion, batches, num_grads=24)
    with pytest.raises(ValueError, match="damping"):
        hk.MFACInverseOperator.from_model(model, criterion, batches, damping=0)
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double()
    with pytest.raises(ValueError, match="mode"):
        hk.MFACInverseOperator.from_model(dropout, criterion, batches)


def test_set_window_is_inserting_the_gradients_one_by_one(gradients):
    G = gradients[:4]
    inserted = hk.MFACInverseOperator(G.shape[1], num_grads=4, damping=0.1, dtype=torch.float64)
    for g in G:
        inserted.update(g)
    x = torch.randn(G.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = inserted @ x  # factorized for the window above
    at_once = hk.MFACInverseOperator(G.shape[1], num_grads=4, damping=0.1, dtype=torch.float64)
    at_once.set_window(G.clone(), G @ G.T, 4)
    torch.testing.assert_close(at_once @ x, before, rtol=1e-12, atol=0)
    inserted.set_window(torch.zeros_like(G), torch.zeros(4, 4, dtype=torch.float64), 0)  # a new window: refactorized
    torch.testing.assert_close(inserted @ x, x / 0.1)
    with pytest.raises(ValueError, match="grads"):
        at_once.set_window(G[:3], G @ G.T, 4)
    with pytest.raises(ValueError, match="gram"):
        at_once.set_window(G.clone(), G[:3] @ G.T, 4)


def test_from_model_with_only_the_required_arguments_is_the_exact_damped_fisher_inverse():
    """Issue 16's defaults check on the held-out regression MLP (771 parameters, 256 samples): with only model,
    criterion and data, the window holds every per-sample gradient and `inv @ x` is (1e-4 I + F_N)^{-1} x, F_N
    the dense empirical Fisher, to float64 precision."""
    import heldout

    p = heldout.regression()
    model = p.model.double()
    data = tuple(t.double() for t in p.train)
    inv = hk.MFACInverseOperator.from_model(model, p.criterion, data)
    fisher = hk.EmpiricalFisherOperator(model, p.criterion, data).dense()
    dense = inv.damping * torch.eye(fisher.shape[0], dtype=torch.float64) + fisher
    x = torch.randn(fisher.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert inv.num_grads == 256 and inv.damping == 1e-4
    assert (dense @ (inv @ x) - x).norm() / x.norm() < 1e-8
