"""Notebook 02 (`02_top_eigenvalues.ipynb`): the eigensolver explorer, the relative error of every
wanted eigenvalue against the products spent by power iteration (with deflation) and by Lanczos.
What it computes lives in `hesskit.experiments.eigenvalues`."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..experiments.eigenvalues import ERROR_FLOOR, lanczos_history, power_iteration_history, relative_errors
from .explorer import Explorer

__all__ = ["EigenExplorer"]


class EigenExplorer(Explorer):
    """k, a budget of products and a tolerance: error vs products for power iteration and Lanczos.

    `matrix` is a dense symmetric matrix (e.g. `op.dense()` of a small model); its products give
    the same numbers as the Hessian-vector products they stand for, only faster. Power iteration
    gets `max_products // k` products per eigenvalue (its `max_iters`), Lanczos `max_products` in all.
    """


    def __init__(self, matrix: Tensor, k: int = 5, max_products: int = 1000, tol: float = 1e-6,
                 products: tuple[int, int, int] = (100, 2000, 100), seed: int = 0, which: str = "largest"):
        import ipywidgets as widgets

        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix: expected a square matrix, got shape {tuple(matrix.shape)}")
        if matrix.shape[0] < 12:
            raise ValueError(f"matrix: expected n >= 12 (k goes up to 10), got n = {matrix.shape[0]}")
        if len(products) != 3 or not 10 <= products[0] <= products[1] or products[2] < 1:
            raise ValueError(f"products: expected (min, max, step) with 10 <= min <= max and step >= 1, got {products}")
        self.matrix = matrix.detach().double()
        self.seed = seed
        self.which = which
        lam = torch.linalg.eigvalsh(self.matrix).cpu().numpy()
        self.eigenvalues = lam
        self.norm = float(np.abs(lam).max())
        super().__init__({
            "k": widgets.IntSlider(value=k, min=1, max=10, description="k", continuous_update=False),
            "max_products": widgets.IntSlider(value=max_products, min=products[0], max=products[1], step=products[2],
                                              description="max products", continuous_update=False),
            "tol": widgets.FloatLogSlider(value=tol, base=10, min=-8, max=-1, step=0.5, description="tol",
                                          readout_format=".0e", continuous_update=False),
        })

    def _exact(self, k: int, which: str) -> np.ndarray:
        lam = self.eigenvalues
        order = {"largest": np.argsort(-lam), "smallest": np.argsort(lam), "magnitude": np.argsort(-np.abs(lam))}[which]
        return lam[order[:k]]

    def compute(self, k: int, max_products: int, tol: float) -> dict:
        power = power_iteration_history(self.matrix, k, max_iters=max(1, max_products // k), tol=tol, seed=self.seed,
                                        progress=True)  # the status line's bar
        lanczos = lanczos_history(self.matrix, k, self.which, tol, max_matvecs=max(k, max_products), seed=self.seed)
        exact_power, exact_lanczos = self._exact(k, "magnitude"), self._exact(k, self.which)
        lam_mag = self.eigenvalues[np.argsort(-np.abs(self.eigenvalues))]
        return {
            "k": k, "max_products": max_products, "tol": tol, "norm": self.norm,
            "power": power, "lanczos": lanczos,
            "exact_power": exact_power, "exact_lanczos": exact_lanczos,
            "power_errors": relative_errors(power.estimates, exact_power),
            "lanczos_errors": relative_errors(lanczos.estimates, exact_lanczos),
            "power_final": relative_errors(power.result.values.numpy(), exact_power),
            "lanczos_final": relative_errors(lanczos.result.values.numpy(), exact_lanczos),
            "power_rate": float(abs(lam_mag[1] / lam_mag[0]) ** 2),  # Rayleigh-quotient error per product
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        k, tol = result["k"], result["tol"]
        fig = Figure(figsize=(11, 4.6), layout="constrained")
        ax_p, ax_l = fig.subplots(1, 2, sharey=True)
        colors = [f"C{i}" for i in range(k)]
        power, lanczos = result["power"], result["lanczos"]
        for i, (start, stop) in enumerate(power.segments):
            x = power.products[start:stop]
            ax_p.semilogy(x, result["power_errors"][start:stop, i], color=colors[i], lw=1.3)
            done = bool(power.result.converged[i])
            ax_p.plot(x[-1], result["power_errors"][stop - 1, i], "o", color=colors[i],
                      mfc=colors[i] if done else "white", ms=6)
        # the rate theory predicts for eigenvalue 1: error ~ C |lambda_2 / lambda_1|^(2t), anchored mid-run
        start, stop = power.segments[0]
        if stop - start >= 4:
            mid = (start + stop) // 2
            t = power.products[start:stop]
            ref = result["power_errors"][mid, 0] * result["power_rate"] ** (t - power.products[mid])
            ax_p.semilogy(t, ref, ":", color="k", lw=1.2, label=r"theory for $\lambda_1$: $|\lambda_2/\lambda_1|^{2t}$")
        for i in range(k):
            done = bool(lanczos.result.converged[i])
            ax_l.semilogy(lanczos.products, result["lanczos_errors"][:, i], color=colors[i], lw=1.3,
                          label=rf"$\lambda_{{{i + 1}}} = {result['exact_lanczos'][i]:.4g}$")
            ax_l.plot(lanczos.products[-1], result["lanczos_errors"][-1, i], "o", color=colors[i],
                      mfc=colors[i] if done else "white", ms=6)
        ax_p.axvline(lanczos.result.num_matvecs, color="0.5", ls="-.", lw=1, label="where Lanczos stopped")
        for ax in (ax_p, ax_l):
            ax.axhline(tol, color="k", ls="--", lw=1, label=f"tol = {tol:.0e}")
            ax.set_xlabel("number of Hessian-vector products")
            ax.set_ylim(ERROR_FLOOR / 3, 10)
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_p.set_ylabel(r"relative error $|\theta_i - \lambda_i| \,/\, |\lambda_i|$")
        nc_p, nc_l = int(power.result.converged.sum()), int(lanczos.result.converged.sum())
        ax_p.set_title(f"power iteration + deflation (hk.power_iteration)\n"
                       f"{power.result.num_matvecs} products, {nc_p}/{k} converged", fontsize=10)
        ax_l.set_title(f"Lanczos (hk.eigenvalues)\n{lanczos.result.num_matvecs} products, {nc_l}/{k} converged",
                       fontsize=10)
        ax_l.plot([], [], "o", color="0.3", label="converged (filled) / not (open)")
        handles, labels = ax_l.get_legend_handles_labels()
        extra = [(h, lab) for h, lab in zip(*ax_p.get_legend_handles_labels()) if lab not in labels]
        ax_l.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], loc="upper left",
                    bbox_to_anchor=(1.02, 1.0), fontsize=8, title="exact eigenvalues", title_fontsize=8)
        fig.suptitle(f"error of the top-{k} eigenvalues vs cost (max {result['max_products']} products; "
                     f"power iteration gets {max(1, result['max_products'] // k)} per eigenvalue)", fontsize=11)
        return fig
