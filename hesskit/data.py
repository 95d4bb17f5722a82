"""Small, offline, seeded data sets: scikit-learn's bundled digits and synthetic tasks made by code.

Every function returns tensors `(inputs, targets)`, or train/test pairs of them; wrap them in
a DataLoader with `loader(...)`. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits", "regression", "classification", "sequences", "loader"]

Pair = tuple[Tensor, Tensor]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(x: Tensor, y: Tensor, test_fraction: float, gen: torch.Generator) -> tuple[Pair, Pair]:
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction: expected a fraction in [0, 1), got {test_fraction}")
    perm = torch.randperm(len(x), generator=gen)
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def digits(test_fraction: float = 0.2, flatten: bool = False, seed: int = 0) -> tuple[Pair, Pair]:
    """The 1797 8x8 handwritten digits bundled with scikit-learn, scaled to [0, 1].

    Returns `(x_train, y_train), (x_test, y_test)`; images have shape (N, 1, 8, 8), or (N, 64)
    with `flatten=True`; labels are int64 in 0..9. The split is a seeded permutation.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0)
    x = x.reshape(len(x), 64) if flatten else x.unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _split(x, y, test_fraction, _generator(seed))


def regression(n: int = 256, dim: int = 5, noise: float = 0.1, seed: int = 0) -> Pair:
    """Linear regression data y = x w + b + noise with x ~ N(0, I): shapes (n, dim) and (n, 1)."""
    gen = _generator(seed)
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, 1, generator=gen)
    y = x @ w + 0.5 + noise * torch.randn(n, 1, generator=gen)
    return x, y


def classification(n: int = 512, dim: int = 2, num_classes: int = 3, spread: float = 1.0, seed: int = 0) -> Pair:
    """Gaussian blobs: `num_classes` clusters in `dim` dimensions with unit-variance noise scaled
    by `spread`. Returns x (n, dim) float32 and labels (n,) int64."""
    gen = _generator(seed)
    centers = 3.0 * torch.randn(num_classes, dim, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    x = centers[y] + spread * torch.randn(n, dim, generator=gen)
    return x, y


def sequences(n: int = 512, length: int = 12, vocab: int = 6, seed: int = 0) -> Pair:
    """A small sequence task: label each token sequence with its most frequent token
    (ties go to the smallest token). Solving it needs attention across positions.
    Returns tokens (n, length) int64 and labels (n,) int64 in 0..vocab-1."""
    gen = _generator(seed)
    bias = torch.rand(n, vocab, generator=gen) ** 2  # uneven token frequencies per sequence
    tokens = torch.multinomial(bias / bias.sum(1, keepdim=True), length, replacement=True, generator=gen)
    counts = torch.nn.functional.one_hot(tokens, vocab).sum(1)
    labels = torch.argmax(counts * (vocab + 1) - torch.arange(vocab), dim=1)
    return tokens, labels


def loader(x: Tensor, y: Tensor, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over (x, y); shuffling is seeded."""
    if len(x) != len(y):
        raise ValueError(f"x, y: expected the same number of samples, got {len(x)} and {len(y)}")
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=_generator(seed) if shuffle else None
    )
