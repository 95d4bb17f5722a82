import matplotlib; matplotlib.use("Agg")  # noqa: E702,I001  (first: no display needed)

# Notebook 00's Hessian helpers: the dense matrix of the digits MLP with its progress reports (the
# core's `op.dense(progress=True)`) and the block-energy sweep over widths and seeds. The explorer:
# tests/widgets/test_hessian_explorer.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.hessian import block_shares, mlp_hessian  # noqa: E402


def test_mlp_hessian_is_op_dense_and_reports_its_columns(progress_to):
    reports = []
    progress_to(lambda done, total, what: reports.append((done, total, what)))
    torch.manual_seed(0)
    (x, y), _ = hk.data.digits(flatten=True, seed=0)
    model = hk.models.MLP(64, (4,), 10, activation="tanh").double()
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x[:32].double(), y[:32]))
    n = op.shape[0]
    assert mlp_hessian(4, 32).matrix.shape == (n, n) and reports == []  # progress off: no reports
    matrix = mlp_hessian(4, 32, progress=True).matrix
    np.testing.assert_allclose(matrix, op.dense().numpy(), rtol=0, atol=1e-14)
    assert np.array_equal(matrix, matrix.T)
    assert [done for done, _, _ in reports] == list(range(256, n, 256)) + [n]  # 256 columns at a time
    assert all(total == n and what == "dense" for _, total, what in reports)


def test_block_shares_over_widths_and_seeds(progress_to):
    reports = []
    progress_to(lambda done, total, what: reports.append((done, total, what)))
    energy, area = block_shares([2, 3], [0, 1, 2], num_samples=32)
    assert energy.shape == (2, 3) and area.shape == (2,)
    assert reports == [(k, 6, "Hessians") for k in range(1, 7)]  # one unit per Hessian, none per column
    assert energy[1, 2] == pytest.approx(mlp_hessian(3, 32, seed=2).energy_share(), rel=1e-12)
    assert area[0] == pytest.approx((65 * 2) ** 2 / 160**2 + (10 * 2 + 10) ** 2 / 160**2, rel=1e-12)  # 2 layers of a 64-2-10 MLP
    assert ((0 < energy) & (energy <= 1)).all()
    assert len(set(energy[0])) == 3  # the seed changes the network, so the share


def test_mlp_hessian_rejects_bad_width():
    with pytest.raises(ValueError, match="width"):
        mlp_hessian(0)
