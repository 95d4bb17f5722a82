"""Small, offline, seeded data sets: scikit-learn's bundled digits and synthetic tasks made by code.

Every function returns tensors `(inputs, targets)`, or train/test pairs of them; wrap them in
a DataLoader with `loader(...)`. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits", "regression", "classification", "sequences", "text", "char_windows", "loader"]

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


# A small probabilistic grammar of English-like sentences: number agreement between subject and
# verb, optional adjectives, objects, prepositional phrases and clauses joined by ", and".
_NOUNS = ("cat", "dog", "bird", "farmer", "teacher", "robot", "king", "horse", "child", "river", "garden", "window")
_PLURALS = {"child": "children"}
_ADJECTIVES = ("small", "old", "happy", "green", "quiet", "clever", "brave", "tired")
_VERBS = ("see", "like", "follow", "find", "watch", "chase", "help", "know")  # transitive; "-s" when singular
_INTRANSITIVE = ("sleep", "run", "sing", "wait", "dream", "smile")
_PLACES = ("in the garden", "near the river", "under a tree", "at night", "on the hill", "by the window")
_ADVERBS = ("quietly", "often", "slowly", "again")


def _noun_phrase(rng) -> tuple[str, bool]:
    plural = rng.random() < 0.4
    noun = rng.choice(_NOUNS)
    noun = _PLURALS.get(noun, noun + "s") if plural else noun
    words = rng.sample(_ADJECTIVES, rng.choice((0, 0, 1, 1, 2))) + [noun]
    det = rng.choice(("the", "some", "many", "two") if plural else ("the", "a", "every", "my"))
    det = "an" if det == "a" and words[0][0] in "aeiou" else det
    return " ".join([det] + words), plural


def _singular(verb: str) -> str:
    return verb + ("es" if verb.endswith(("ch", "sh", "s")) else "s")


def _clause(rng) -> str:
    subject, plural = _noun_phrase(rng)
    if rng.random() < 0.6:
        verb = rng.choice(_VERBS)
        predicate = f"{verb if plural else _singular(verb)} {_noun_phrase(rng)[0]}"
    else:
        verb = rng.choice(_INTRANSITIVE)
        predicate = verb if plural else _singular(verb)
    if rng.random() < 0.3:
        predicate += " " + rng.choice(_ADVERBS)
    if rng.random() < 0.4:
        predicate += " " + rng.choice(_PLACES)
    return f"{subject} {predicate}"


def text(num_chars: int = 50_000, seed: int = 0) -> str:
    """A seeded corpus of `num_chars` characters of English-like sentences from a small
    probabilistic grammar (lower case, spaces, commas and full stops: 26 distinct characters).

    Subject-verb agreement ("the dog sees" / "the dogs see") and a fixed vocabulary give a
    character model structure to learn: a small transformer gets well below the unigram entropy.
    """
    import random

    if num_chars < 1:
        raise ValueError(f"num_chars: expected a positive integer, got {num_chars}")
    rng, parts, size = random.Random(seed), [], 0
    while size < num_chars:
        sentence = _clause(rng) + (", and " + _clause(rng) if rng.random() < 0.25 else "") + ". "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:num_chars]


def char_windows(corpus: str, length: int = 64, test_fraction: float = 0.1, stride: int | None = None):
    """Next-character prediction windows from `corpus`.

    Returns `(x_train, y_train), (x_test, y_test), vocab`: x holds windows of `length` character
    ids (N, length) int64, y the same windows shifted by one character (the next-character
    targets), and `vocab` the sorted string of characters (id i is `vocab[i]`). The test windows
    come from the last `test_fraction` of the corpus, so no test text is seen in training.
    Consecutive windows start `stride` characters apart (default: `length`, no overlap).
    """
    stride = length if stride is None else stride
    if length < 1 or stride < 1:
        raise ValueError(f"length, stride: expected positive integers, got {length} and {stride}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction: expected a fraction in [0, 1), got {test_fraction}")
    vocab = "".join(sorted(set(corpus)))
    ids = torch.tensor([vocab.index(c) for c in corpus], dtype=torch.int64)
    cut = int(round((1 - test_fraction) * len(ids)))

    def windows(part: Tensor) -> Pair:
        if len(part) < length + 1:
            raise ValueError(f"corpus: too short for windows of length {length} (one part has {len(part)} characters)")
        w = part.unfold(0, length + 1, stride)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    empty = ids.new_zeros(0, length)
    return windows(ids[:cut]), windows(ids[cut:]) if cut < len(ids) else (empty, empty), vocab


def loader(x: Tensor, y: Tensor, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over (x, y); shuffling is seeded."""
    if len(x) != len(y):
        raise ValueError(f"x, y: expected the same number of samples, got {len(x)} and {len(y)}")
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=_generator(seed) if shuffle else None
    )
