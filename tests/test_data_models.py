"""The offline data sets and reference models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hesskit as hk


def test_digits_is_offline_seeded_and_scaled():
    (x, y), (xt, yt) = hk.data.digits(seed=0)
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797 and len(xt) == round(0.2 * 1797)
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    (x2, _), _ = hk.data.digits(seed=0)
    assert torch.equal(x, x2)
    (x3, _), _ = hk.data.digits(seed=1)
    assert not torch.equal(x, x3)
    (xf, _), _ = hk.data.digits(flatten=True)
    assert xf.shape[1] == 64


def test_synthetic_sets():
    x, y = hk.data.regression(n=50, dim=4, seed=0)
    assert x.shape == (50, 4) and y.shape == (50, 1)
    x, y = hk.data.classification(n=60, dim=2, num_classes=3, seed=0)
    assert x.shape == (60, 2) and set(y.tolist()) == {0, 1, 2}
    tokens, labels = hk.data.sequences(n=40, length=7, vocab=5, seed=0)
    counts = torch.nn.functional.one_hot(tokens, 5).sum(1)
    for c, label in zip(counts, labels):
        assert c[label] == c.max() and (c[:label] < c.max()).all()  # most frequent, smallest on ties
    batches = list(hk.data.loader(x, y, batch_size=25))
    assert [len(b[1]) for b in batches] == [25, 25, 10]
    with pytest.raises(ValueError, match="x, y"):
        hk.data.loader(x, y[:3])


def test_reference_models_run_and_have_the_documented_sizes():
    (x, _), _ = hk.data.digits()
    cnn = hk.models.SmallCNN()
    assert sum(p.numel() for p in cnn.parameters()) == 6090
    assert cnn(x[:4]).shape == (4, 10)
    assert hk.models.BatchNormCNN()(x[:4]).shape == (4, 10)
    assert hk.models.MLP(64, (32,), 10)(x[:4]).shape == (4, 10)
    tokens, _ = hk.data.sequences(n=4, length=9, vocab=6)
    assert hk.models.TinyTransformer(vocab=6)(tokens).shape == (4, 6)
    with pytest.raises(ValueError, match="activation"):
        hk.models.MLP(activation="swish")


def test_notebooks_are_committed_without_outputs():
    for path in sorted(Path(__file__).parents[1].glob("notebooks/*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name
