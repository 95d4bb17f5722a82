"""Notebook 00 (`00_hessians_and_hvps.ipynb`): the dense Hessian of a small MLP and its layer-block structure.

Studies: the exact Hessian of a 64-width-10 MLP on digits with its parameter blocks
(`mlp_hessian`, `HessianBlocks`: the share of ||H||_F^2 inside the within-layer blocks against
their share of the entries), and that share over widths and initialisation seeds
(`block_shares`). The notebook's explorer is `hesskit.widgets.hessian.HessianExplorer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import progress
from ..curvature.operators import HessianOperator, layer_groups
from ..models import MLP

__all__ = ["HessianBlocks", "mlp_hessian", "block_shares"]


@dataclass
class HessianBlocks:
    """A dense Hessian with the parameter blocks it is made of."""

    matrix: np.ndarray
    names: list[str]  # parameter names, in order
    offsets: list[int]  # start index of each parameter block (plus n at the end)

    def block(self, name: str) -> np.ndarray:
        i = self.names.index(name)
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.matrix[a:b, a:b]

    def layer_ranges(self) -> list[tuple[int, int]]:
        """Index ranges of each layer (weight and bias of one module together)."""
        ranges = []
        for names in layer_groups(self.names).values():
            first, last = self.names.index(names[0]), self.names.index(names[-1])
            ranges.append((self.offsets[first], self.offsets[last + 1]))
        return ranges

    def energy_share(self) -> float:
        """Fraction of ||H||_F^2 inside the within-layer diagonal blocks."""
        inside = sum((self.matrix[a:b, a:b] ** 2).sum() for a, b in self.layer_ranges())
        return float(inside / (self.matrix**2).sum())

    def area_share(self) -> float:
        """Fraction of the entries that the within-layer blocks cover (the share if H were uniform)."""
        n = self.matrix.shape[0]
        return sum((b - a) ** 2 for a, b in self.layer_ranges()) / n**2


def mlp_hessian(width: int, num_samples: int = 256, activation: str = "tanh", seed: int = 0,
                progress: bool = False) -> HessianBlocks:
    """The exact Hessian of a 64-width-10 MLP's cross-entropy on digits (float64), by `op.dense()`.
    `progress=True` shows a bar of its products (in the status line of an explorer that renders it)."""
    from ..data import digits

    if not 1 <= width <= 64:
        raise ValueError(f"width: expected 1..64 hidden units, got {width}")
    torch.manual_seed(seed)
    (x, y), _ = digits(flatten=True, seed=seed)
    model = MLP(64, (width,), 10, activation=activation).double()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x[:num_samples].double(), y[:num_samples]))
    sizes = [p.numel() for p in op.params]
    offsets = [0, *np.cumsum(sizes).tolist()]
    return HessianBlocks(op.dense(progress=progress).cpu().numpy(), op.param_names, offsets)


def block_shares(widths, seeds, num_samples: int = 256, activation: str = "tanh") -> tuple[np.ndarray, np.ndarray]:
    """How block-diagonal the Hessian of `mlp_hessian` is, over widths and initialisation seeds:
    (energy, area) with energy[i, j] = `energy_share()` at widths[i], seeds[j] and area[i] =
    `area_share()` at widths[i] (the energy share a structureless matrix would have). Reports one
    unit per Hessian to `progress`."""
    widths, seeds = list(widths), list(seeds)
    energy = np.zeros((len(widths), len(seeds)))
    area = np.zeros(len(widths))
    for i, width in enumerate(widths):
        for j, seed in enumerate(seeds):
            H = mlp_hessian(width, num_samples, activation=activation, seed=seed)
            energy[i, j] = H.energy_share()
            progress.report(i * len(seeds) + j + 1, len(widths) * len(seeds), "Hessians")
        area[i] = H.area_share()
    return energy, area
