"""Notebook 00: the dense Hessian of a small MLP and its layer-block structure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models import MLP
from ..curvature.operators import HessianOperator, layer_groups
from .explorer import Explorer
from .. import progress

__all__ = ["HessianExplorer", "HessianBlocks", "mlp_hessian", "dense_matrix", "block_shares"]


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
                report: bool = True) -> HessianBlocks:
    """The exact Hessian of a 64-width-10 MLP's cross-entropy on digits (float64). `report`: tell
    `progress` how many of its columns are done (off when a caller reports its own units)."""
    from ..data import digits

    if not 1 <= width <= 64:
        raise ValueError(f"width: expected 1..64 hidden units, got {width}")
    torch.manual_seed(seed)
    (x, y), _ = digits(flatten=True, seed=seed)
    model = MLP(64, (width,), 10, activation=activation).double()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x[:num_samples].double(), y[:num_samples]))
    sizes = [p.numel() for p in op.params]
    offsets = [0, *np.cumsum(sizes).tolist()]
    return HessianBlocks(dense_matrix(op, report=report), op.param_names, offsets)


def block_shares(widths, seeds, num_samples: int = 256, activation: str = "tanh") -> tuple[np.ndarray, np.ndarray]:
    """How block-diagonal the Hessian of `mlp_hessian` is, over widths and initialisation seeds:
    (energy, area) with energy[i, j] = `energy_share()` at widths[i], seeds[j] and area[i] =
    `area_share()` at widths[i] (the energy share a structureless matrix would have)."""
    widths, seeds = list(widths), list(seeds)
    energy = np.zeros((len(widths), len(seeds)))
    area = np.zeros(len(widths))
    for i, width in enumerate(widths):
        for j, seed in enumerate(seeds):
            H = mlp_hessian(width, num_samples, activation=activation, seed=seed, report=False)
            energy[i, j] = H.energy_share()
            progress.report(i * len(seeds) + j + 1, len(widths) * len(seeds), "Hessians")
        area[i] = H.area_share()
    return energy, area


def dense_matrix(op: HessianOperator, chunk: int = 128, report: bool = True) -> np.ndarray:
    """`op.dense()`, column block by column block, reporting the products done to `progress`
    (a bar in the explorer's status line while it renders; the width-64 Hessian takes seconds)."""
    n = op.shape[0]
    eye = torch.eye(n, dtype=op.dtype, device=op.device)
    columns = []
    for start in range(0, n, chunk):
        columns.append(op @ eye[:, start : start + chunk])
        if report:
            progress.report(min(start + chunk, n), n, "Hessian columns")
    matrix = torch.cat(columns, dim=1)
    return ((matrix + matrix.T) / 2).cpu().numpy()


class HessianExplorer(Explorer):
    """Width slider and block choice: a heat map of the Hessian (or one of its blocks)."""

    def __init__(self, widths: tuple[int, int] = (2, 16), width: int = 6, num_samples: int = 256):
        import ipywidgets as widgets

        self.num_samples = num_samples
        self._cache: dict[int, HessianBlocks] = {}
        names = ["all", "1.weight", "1.bias", "3.weight", "3.bias"]  # MLP = Flatten, Linear, act, Linear
        super().__init__({
            "width": widgets.IntSlider(value=width, min=widths[0], max=widths[1], description="hidden width",
                                       continuous_update=False),
            "block": widgets.Dropdown(options=names, value="all", description="block"),
        })

    def compute(self, width: int, block: str) -> dict:
        if width not in self._cache:
            self._cache[width] = mlp_hessian(width, self.num_samples)
        H = self._cache[width]
        shown = H.matrix if block == "all" else H.block(block)
        return {"hessian": H, "shown": shown, "block": block, "width": width, "n": H.matrix.shape[0],
                "energy_share": H.energy_share(), "area_share": H.area_share()}

    def draw(self, result: dict):
        from matplotlib.colors import SymLogNorm
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 5.2))
        ax = fig.subplots()
        shown = result["shown"]
        scale = max(np.abs(shown).max(), 1e-12)
        image = ax.imshow(shown, cmap="RdBu_r", norm=SymLogNorm(linthresh=scale * 1e-3, vmin=-scale, vmax=scale))
        fig.colorbar(image, ax=ax, label="Hessian entry (symmetric log scale)")
        if result["block"] == "all":
            H = result["hessian"]
            for edge in H.offsets[1:-1]:
                ax.axhline(edge - 0.5, color="k", lw=0.6)
                ax.axvline(edge - 0.5, color="k", lw=0.6)
            ax.set_title(f"Hessian of a 64-{result['width']}-10 MLP, n = {result['n']}\n"
                         f"within-layer blocks: {100 * result['energy_share']:.0f}% of ||H||_F^2 "
                         f"on {100 * result['area_share']:.0f}% of the entries", fontsize=10)
        else:
            ax.set_title(f"block {result['block']}: {shown.shape[0]} x {shown.shape[0]}")
        ax.set_xlabel("parameter index")
        ax.set_ylabel("parameter index")
        return fig
