"""Every operator against the exact dense matrix, on every model of the zoo, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from conftest import CASES, KINDS, make_case, tensors_around
from torch import nn

import hesskit as hk


def _close(a, b, rtol=1e-9):
    scale = max(b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_operator_matches_dense_reference(case, kind):
    op = KINDS[kind](case.model, case.criterion, case.batches)
    expected = ref.DENSE[kind](case.model, case.names, case.batches, case.criterion)
    assert op.shape == (case.num_params, case.num_params)
    _close(op.dense(), expected)


@pytest.mark.parametrize("name", CASES)
def test_reference_hessian_matches_finite_differences(name):
    case = make_case(name)
    H = ref.hessian(case.model, case.names, case.batches, case.criterion)
    columns = sorted(set(np.linspace(0, case.num_params - 1, 6).astype(int).tolist()))
    if name == "layernorm":  # include LayerNorm weights, where torch.func's derivatives go wrong
        offset = 0
        for n, p in case.model.named_parameters():
            if n == "norm1.weight":
                columns += [offset, offset + 1]
            offset += p.numel()
    fd = ref.finite_difference_hessian_columns(case.model, case.names, case.batches, case.criterion, columns)
    assert (H[:, columns] - fd).abs().max().item() < 1e-6 * max(1.0, H.abs().max().item())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["mlp", "layernorm", "bn_cnn"])
def test_batched_and_looped_products_agree(name, kind):
    case = make_case(name)
    V = torch.randn(case.num_params, 5, dtype=torch.float64)
    looped = KINDS[kind](case.model, case.criterion, case.batches, batched_products=False) @ V
    batched = KINDS[kind](case.model, case.criterion, case.batches, batched_products=True) @ V
    single = KINDS[kind](case.model, case.criterion, case.batches) @ V[:, 2]
    _close(batched, looped)
    _close(single, looped[:, 2])


@pytest.mark.parametrize("kind", list(KINDS))
def test_dataloader_without_cache_equals_list(kind):
    case = make_case("mlp")
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    loader = hk.data.loader(x, y, batch_size=10)  # batches of 10, 10, 3: ragged
    op_loader = KINDS[kind](case.model, case.criterion, loader)
    assert op_loader.budget == 0 and not op_loader.cached_batches
    op_single = KINDS[kind](case.model, case.criterion, (x, y))
    v = torch.randn(case.num_params, dtype=torch.float64)
    _close(op_loader @ v, op_single @ v)


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_fn_equals_criterion(kind):
    case = make_case("cnn")
    loss_fn = lambda model, batch: case.criterion(model(batch[0]), batch[1])  # noqa: E731
    v = torch.randn(case.num_params, dtype=torch.float64)
    by_criterion = KINDS[kind](case.model, case.criterion, case.batches) @ v
    if kind == "ggn":  # the GGN needs the outputs: loss_fn returns (loss, outputs)
        with pytest.raises(ValueError, match=r"\(loss, outputs\)"):
            KINDS[kind](case.model, data=case.batches, loss_fn=loss_fn) @ v

        def loss_fn(model, batch):
            outputs = model(batch[0])
            return case.criterion(outputs, batch[1]), outputs

    by_loss_fn = KINDS[kind](case.model, data=case.batches, loss_fn=loss_fn) @ v
    _close(by_loss_fn, by_criterion)


def test_blocks_are_the_diagonal_blocks():
    case = make_case("cnn")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    H = op.dense()
    offset, seen = 0, []
    for name, block in op.blocks():
        size = block.shape[0]
        _close(block.dense(), H[offset : offset + size, offset : offset + size])
        seen += block.param_names
        offset += size
    assert seen == op.param_names and offset == op.shape[0]
    names = [name for name, _ in op.blocks()]
    assert names == ["0", "3", "7"]  # conv1, conv2, head: weight and bias together
    assert len(list(op.blocks(by="parameter"))) == 6


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_block_products_are_detached_blocks_of_the_full_matrix(kind):
    case = make_case("cnn")
    full = KINDS[kind](case.model, case.criterion, case.batches).dense()
    offset = 0
    for name, block in KINDS[kind](case.model, case.criterion, case.batches).blocks():
        size = block.shape[0]
        product = block @ torch.ones(size, dtype=torch.float64)
        assert not product.requires_grad, name  # no graph through the parameters outside the block
        _close(block.dense(), full[offset : offset + size, offset : offset + size])
        offset += size


def test_params_by_name_tensor_and_module_select_the_same_block():
    case = make_case("mlp")
    layer = case.model[1]
    by_module = hk.HessianOperator(case.model, case.criterion, case.batches, params=layer)
    by_names = hk.HessianOperator(case.model, case.criterion, case.batches, params=["1.weight", "1.bias"])
    by_tensors = hk.HessianOperator(case.model, case.criterion, case.batches, params=[layer.weight, layer.bias])
    full = hk.HessianOperator(case.model, case.criterion, case.batches).dense()
    n = layer.weight.numel() + layer.bias.numel()
    for op in (by_module, by_names, by_tensors):
        _close(op.dense(), full[:n, :n])


def test_to_scipy_eigsh_matches_dense():
    from scipy.sparse.linalg import eigsh

    case = make_case("mlp")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    top = eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    exact = torch.linalg.eigvalsh(op.dense())[-3:].numpy()
    np.testing.assert_allclose(np.sort(top), exact, rtol=1e-8)


def test_float32_model_and_vector_dtype_follow_the_model():
    case = make_case("mlp")
    model = case.model.float()
    batches = [(x.float(), y) for x, y in case.batches]
    op = hk.HessianOperator(model, case.criterion, batches)
    out = op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert out.dtype == torch.float32 and op.dtype == torch.float32


def _snapshot(model):
    return dict(
        modes=[m.training for m in model.modules()],
        params=[p.detach().clone() for p in model.parameters()],
        grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
        requires=[p.requires_grad for p in model.parameters()],
        buffers=[b.clone() for b in model.buffers()],
    )


def _assert_same(before, after):
    assert before["modes"] == after["modes"]
    assert before["requires"] == after["requires"]
    for a, b in zip(before["params"] + before["buffers"], after["params"] + after["buffers"]):
        assert torch.equal(a, b)
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("kind", list(KINDS))
def test_calls_leave_the_model_as_it_was(kind):
    case = make_case("bn_cnn")
    model = case.model
    model.train()
    model[0].eval()  # a mixed mode must come back exactly
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])  # an existing .grad must survive
    before = _snapshot(model)
    op = KINDS[kind](model, case.criterion, case.batches, mode="eval")
    hk.trace(op, num_matvecs=6, seed=0)
    hk.eigenvalues(op, k=2, seed=0, max_matvecs=20)
    hk.diagonal(op, num_matvecs=4, seed=0)
    hk.spectral_density(op, num_runs=2, num_steps=4, seed=0)
    _assert_same(before, _snapshot(model))


def test_train_mode_batchnorm_needs_an_explicit_choice():
    case = make_case("bn_cnn")
    case.model.train()
    with pytest.raises(ValueError, match="mode"):
        hk.HessianOperator(case.model, case.criterion, case.batches)
    with pytest.raises(ValueError, match="mode"):
        hk.EmpiricalFisherOperator(case.model, case.criterion, case.batches, mode="train")


def test_train_mode_uses_batch_statistics_and_restores_running_stats():
    case = make_case("bn_cnn")
    case.model.train()
    before = _snapshot(case.model)
    op = hk.HessianOperator(case.model, case.criterion, case.batches, mode="train")
    H = op.dense()
    _assert_same(before, _snapshot(case.model))
    reference_model = make_case("bn_cnn").model.train()  # the reference mutates running stats itself
    expected = ref.hessian(reference_model, case.names, case.batches, case.criterion)
    _close(H, expected)


def test_dropout_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="mode"):
        hk.HessianOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="dropout"):
        hk.HessianOperator(model, nn.CrossEntropyLoss(), data, mode="train")
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), data, mode="eval")
    assert torch.allclose(op.dense(), hk.HessianOperator(model.eval(), nn.CrossEntropyLoss(), data).dense())


def test_cache_follows_parameter_updates():
    case = make_case("mlp")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    first = op @ v
    with torch.no_grad():
        case.model[1].weight.mul_(1.5)
    second = op @ v
    fresh = hk.HessianOperator(case.model, case.criterion, case.batches, cache_memory=0) @ v
    _close(second, fresh)
    assert not torch.allclose(first, second)


def test_hundreds_of_products_do_not_grow_memory():
    case = make_case("cnn")
    for kind in KINDS.values():
        op = kind(case.model, case.criterion, case.batches)
        v = torch.randn(op.shape[0], dtype=torch.float64)
        op @ v
        before, after = tensors_around(lambda: op @ v, 300)
        assert after <= before + 2, (kind.__name__, before, after)


# ---------------------------------------------------------------- bad input
def _mlp():
    case = make_case("mlp")
    return case.model, case.criterion, case.batches


def test_rejects_non_scalar_and_sum_reduced_losses():
    model, _, data = _mlp()
    with pytest.raises(ValueError, match="reduction"):
        hk.HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), data)
    with pytest.raises(ValueError, match="scalar"):  # at construction (the train-mode randomness check) or product
        op = hk.HessianOperator(model, data=data, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
        op @ torch.zeros(op.shape[0], dtype=torch.float64)


def test_rejects_empty_data():
    model, criterion, _ = _mlp()
    with pytest.raises(ValueError, match="data"):
        hk.HessianOperator(model, criterion, [])
    with pytest.raises(ValueError, match="data"):
        hk.HessianOperator(model, criterion, None)
    op = hk.HessianOperator(model, criterion, (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64)
    with pytest.raises(TypeError, match="one-shot"):
        hk.HessianOperator(model, criterion, (b for b in [(torch.zeros(2, 4), torch.zeros(2))]))


def test_rejects_parameters_without_grad():
    model, criterion, data = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="params"):
        hk.HessianOperator(model, criterion, data)
    model[1].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="require grad"):
        hk.HessianOperator(model, criterion, data, params=["1.weight", "1.bias"])
    with pytest.raises(ValueError, match="no parameter named"):
        hk.HessianOperator(model, criterion, data, params=["nope"])


def test_rejects_bad_vectors():
    model, criterion, data = _mlp()
    op = hk.HessianOperator(model, criterion, data)
    n = op.shape[0]
    with pytest.raises(ValueError, match=rf"v: expected shape \({n},\)"):
        op @ torch.zeros(n + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="v: "):
        op @ torch.zeros(n, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="nan"):
        op @ torch.full((n,), float("nan"), dtype=torch.float64)
    with pytest.raises(TypeError, match="v: "):
        op @ [0.0] * n


def test_rejects_inputs_the_model_cannot_take_and_non_finite_losses():
    model, criterion, _ = _mlp()
    op = hk.HessianOperator(model, criterion, (torch.zeros(3, 7, dtype=torch.float64), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="cannot take the inputs"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64)
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1, 2] = float("nan")
    for kind in KINDS.values():
        op = kind(model, criterion, (x, torch.zeros(3, dtype=torch.long)))
        with pytest.raises(ValueError, match="nan"):
            op @ torch.zeros(op.shape[0], dtype=torch.float64)


def test_rejects_bad_arguments():
    model, criterion, data = _mlp()
    with pytest.raises(TypeError, match="model"):
        hk.HessianOperator(lambda x: x, criterion, data)
    with pytest.raises(ValueError, match="criterion/loss_fn"):
        hk.HessianOperator(model, None, data)
    with pytest.raises(ValueError, match="mode"):
        hk.HessianOperator(model, criterion, data, mode="training")
    op = hk.HessianOperator(model, criterion, data)
    with pytest.raises(ValueError, match="by"):
        list(op.blocks(by="layer"))


def test_rejects_non_finite_products_from_a_finite_loss():
    """|w|^1.5 has a finite loss and gradient at w = 0 but an infinite second derivative."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    op = hk.HessianOperator(model, data=(torch.ones(1, 2),), loss_fn=lambda m, b: m.weight.abs().pow(1.5).sum())
    with pytest.raises(ValueError, match="nan or inf"):
        op @ torch.ones(2, dtype=torch.float64)


def test_exact_ggn_diagonal_matches_the_dense_ggn(case):
    """GGNOperator.exact_diagonal (per-sample output-Hessian factors, no probes) equals diag of the dense GGN."""
    op = hk.GGNOperator(case.model, case.criterion, case.batches)
    torch.testing.assert_close(op.exact_diagonal(), op.dense().diagonal(), rtol=1e-10, atol=1e-12)
    first = case.names[:1]
    block = op.restrict(first)
    torch.testing.assert_close(block.exact_diagonal(), block.dense().diagonal(), rtol=1e-10, atol=1e-12)


def test_exact_ggn_diagonal_refuses_a_loss_that_is_not_a_mean_of_sample_losses():
    case = make_case("mlp")
    summed = lambda f, y: nn.functional.cross_entropy(f, y, reduction="sum")  # noqa: E731
    with pytest.raises(ValueError, match="mean of the per-sample"):
        hk.GGNOperator(case.model, summed, case.batches).exact_diagonal()


def test_per_sample_gradients_are_the_rows_of_the_empirical_fisher():
    case = make_case("mlp")  # ragged batches of 10, 10 and 3 samples
    op = hk.EmpiricalFisherOperator(case.model, case.criterion, case.batches)
    G = op.per_sample_gradients()
    assert G.shape == (23, case.num_params)
    _close(G.T @ G / 23, op.dense(), rtol=1e-12)
    x, y = case.batches[0]
    single = torch.cat([g.reshape(-1) for g in torch.autograd.grad(case.criterion(case.model(x[:1]), y[:1]),
                                                                   list(case.model.parameters()))])
    _close(G[0], single, rtol=1e-12)
    torch.testing.assert_close(op.per_sample_gradients(limit=12), G[:12], rtol=0, atol=0)
