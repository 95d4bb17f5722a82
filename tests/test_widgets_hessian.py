import matplotlib; matplotlib.use("Agg")  # noqa: E702,I001  (first: no display needed)

# Notebook 00's Hessian helpers: the dense matrix built block by block with progress reports, the
# block-energy sweep over widths and seeds, and the explorer's progress bar while it renders.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from conftest import record_progress  # noqa: E402
from hesskit.widgets.hessian import HessianExplorer, block_shares, dense_matrix, mlp_hessian  # noqa: E402


def test_dense_matrix_is_op_dense_and_reports_its_columns():
    torch.manual_seed(0)
    model = hk.models.MLP(12, (5,), 3, activation="tanh").double()
    x, y = torch.randn(20, 12, dtype=torch.float64), torch.randint(0, 3, (20,))
    op = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    n = op.shape[0]
    assert record_progress(dense_matrix, op, chunk=16, report=False)[1] == []
    matrix, reports = record_progress(dense_matrix, op, chunk=16)
    np.testing.assert_allclose(matrix, op.dense().numpy(), rtol=0, atol=1e-14)
    assert np.array_equal(matrix, matrix.T)
    assert [done for done, _, _ in reports] == list(range(16, n, 16)) + [n]
    assert all(total == n and what == "Hessian columns" for _, total, what in reports)


def test_block_shares_over_widths_and_seeds():
    (energy, area), reports = record_progress(block_shares, [2, 3], [0, 1, 2], num_samples=32)
    assert energy.shape == (2, 3) and area.shape == (2,)
    assert energy[1, 2] == pytest.approx(mlp_hessian(3, 32, seed=2).energy_share(), rel=1e-12)
    assert area[0] == pytest.approx((65 * 2) ** 2 / 160**2 + (10 * 2 + 10) ** 2 / 160**2, rel=1e-12)  # 2 layers of a 64-2-10 MLP
    assert ((0 < energy) & (energy <= 1)).all()
    assert len(set(energy[0])) == 3  # the seed changes the network, so the share
    assert reports == [(k, 6, "Hessians") for k in range(1, 7)]  # one unit per Hessian, none per column


def test_hessian_explorer_shows_progress_while_it_renders():
    explorer = HessianExplorer(widths=(2, 4), width=2, num_samples=16)
    explorer.show()
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["width"].value = 4  # a new width: a new Hessian, column block by column block
    assert any("Hessian columns" in s and "<progress" in s for s in seen)
    assert explorer.status.value == "" and explorer.result["n"] == 75 * 4 + 10
