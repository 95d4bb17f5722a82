"""Notebook 00 (`00_hessians_and_hvps.ipynb`): the Hessian explorer, a heat map of the dense
Hessian of a small MLP or of one of its layer blocks. What it computes lives in
`hesskit.experiments.hessian`."""

from __future__ import annotations

import numpy as np

from ..experiments.hessian import HessianBlocks, mlp_hessian
from .explorer import Explorer

__all__ = ["HessianExplorer"]


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
            self._cache[width] = mlp_hessian(width, self.num_samples, progress=True)  # the status line's bar
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
