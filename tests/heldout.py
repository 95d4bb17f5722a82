"""Two held-out problems for the defaults tests (issue 16): problems no hesskit default was tuned on.

- `regression()`: a 12-48-3 tanh MLP fitting a random 12-16-3 teacher network plus noise, MSE, 256
  samples, one full batch (deterministic gradients: the case where empirical-Fisher methods
  are most fragile).
- `classifier()`: a 64-128-64-32-10 ReLU MLP on scikit-learn's bundled digits (a split and an
  architecture of its own), trained with Adam to about 97% test accuracy; the model the
  compression functions start from.

Everything is built from explicit `torch.Generator`s: nothing here touches the global seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

import hesskit as hk


@dataclass
class Problem:
    model: nn.Module
    criterion: nn.Module
    train: tuple  # (x, y), one full batch
    test: tuple

    def loss(self, model: nn.Module | None = None, split: str = "train") -> float:
        x, y = self.train if split == "train" else self.test
        with torch.no_grad():
            return float(self.criterion((model or self.model)(x), y))

    def accuracy(self, model: nn.Module | None = None, split: str = "test") -> float:
        x, y = self.train if split == "train" else self.test
        with torch.no_grad():
            return float(((model or self.model)(x).argmax(1) == y).float().mean())


def _init(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """PyTorch's default Linear init, drawn from `gen` instead of the global generator."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = m.in_features ** -0.5
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
    return model


def regression(seed: int = 0) -> Problem:
    """A fresh, untrained 12-48-3 tanh MLP and its data (train: 256 samples; test: 256 more)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher = _init(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)), gen)
    x = torch.randn(512, 12, generator=gen)
    with torch.no_grad():
        y = 2.0 * teacher(x) + 0.05 * torch.randn(512, 3, generator=gen)
    model = _init(nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 3)), gen)
    return Problem(model, nn.MSELoss(), (x[:256], y[:256]), (x[256:], y[256:]))


def untrained_classifier(seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(2000 + seed)
    (xtr, ytr), (xte, yte) = hk.data.digits(test_fraction=0.25, flatten=True, seed=7 + seed)
    model = _init(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), gen)
    return Problem(model, nn.CrossEntropyLoss(), (xtr, ytr), (xte, yte))


@lru_cache(maxsize=None)
def _trained_state(seed: int) -> dict:
    p = untrained_classifier(seed)
    gen = torch.Generator().manual_seed(3000 + seed)
    opt = torch.optim.Adam(p.model.parameters(), lr=1e-3)
    x, y = p.train
    for _ in range(30):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            p.criterion(p.model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.clone() for k, v in p.model.state_dict().items()}


def classifier(seed: int = 0) -> Problem:
    """The digits MLP, trained (cached per seed; every call returns a fresh copy)."""
    p = untrained_classifier(seed)
    p.model.load_state_dict(_trained_state(seed))
    p.model.eval()
    return p
