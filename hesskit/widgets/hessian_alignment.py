"""Notebook 16 (`16_hessian_alignment.ipynb`): the Hessian-alignment explorer, HGP or Hutchinson with
their weights and penalty schedule against ERM on colored digits. What it trains lives in
`hesskit.experiments.hessian_alignment`."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..experiments.hessian_alignment import DomainTask, colored_digits, train_domains
from ..experiments.training import TrainingRun
from .explorer import Explorer

__all__ = ["HessianAlignmentExplorer"]

METHOD_OPTIONS = {"HGP (H g)": "hgp", "Hutchinson (diag H)": "hutchinson"}
COLORS = {"erm": "C3", "hgp": "C0", "hutchinson": "C2"}


class HessianAlignmentExplorer(Explorer):
    """The penalty's method, its weights alpha (Hessian term) and beta (gradient term), the penalty
    weight after the anneal steps and the anneal length, against ERM trained from the same weights
    on the same batches: accuracy on the training and held-out domains, the transfer measure
    max_e ||H_e - H_test||_2 over training, and the penalty's two terms per step."""

    def __init__(self, task: DomainTask | None = None, steps: int = 500, seed: int = 0, method: str = "HGP (H g)",
                 alpha: float = 1.0, beta: float = 1.0, penalty_weight: float = 1e4, anneal_steps: int = 150,
                 eval_every: int = 50, **settings: Any):
        import ipywidgets as widgets

        self.task = colored_digits() if task is None else task
        self.steps, self.seed, self.eval_every, self.settings = steps, seed, eval_every, settings
        self._cache: dict[tuple, TrainingRun] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "method": widgets.ToggleButtons(options=list(METHOD_OPTIONS), value=method, description="penalty",
                                            style=style),
            "alpha": widgets.FloatLogSlider(value=alpha, base=10, min=-6, max=2, step=0.5, readout_format=".0e",
                                            description="alpha (Hessian term)", continuous_update=False, style=style),
            "beta": widgets.FloatLogSlider(value=beta, base=10, min=-6, max=2, step=0.5, readout_format=".0e",
                                           description="beta (gradient term)", continuous_update=False, style=style),
            "penalty_weight": widgets.FloatLogSlider(value=penalty_weight, base=10, min=0, max=5, step=0.5,
                                                     readout_format=".0e", description="penalty weight",
                                                     continuous_update=False, style=style),
            "anneal_steps": widgets.IntSlider(value=anneal_steps, min=0, max=steps, step=max(steps // 20, 1),
                                              description="weight 1 for the first", continuous_update=False,
                                              style=style),
        })

    def _key(self, method: str, settings: dict) -> tuple:
        if method == "erm":
            return ("erm", self.steps, self.seed)
        return (method, f"{settings['alpha']:.6g}", f"{settings['beta']:.6g}", f"{settings['penalty_weight']:.6g}",
                int(settings["anneal_steps"]), self.steps, self.seed)

    def add_runs(self, runs: Sequence[TrainingRun]) -> None:
        """Reuse runs trained elsewhere (e.g. the notebook's comparison) instead of training them
        again: a run is used when it was trained on this task with this explorer's steps, seed,
        checkpoints and other settings (defaults included), with its transfer gaps measured; its
        method, weights and schedule then place it under the controls that show it."""
        for r in runs:
            measured = "hessian_gap_test" in r.evals  # trained with measure=True: the explorer draws the gaps
            if measured and all(r.settings.get(k) == v for k, v in self._fixed(r.optimizer).items()):
                self._cache[self._key(r.optimizer, r.settings)] = r

    def _fixed(self, method: str) -> dict[str, Any]:
        """The settings a reusable run of `method` must share with this explorer's runs."""
        defaults = {k: p.default for k, p in inspect.signature(train_domains).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        fixed = {k: v for k, v in {**defaults, **self.settings}.items()
                 if k in ("lr", "batch_size", "l2", "hidden", "num_probes", "center")}
        if method != "hutchinson":
            fixed.pop("num_probes", None)
        if method == "erm":
            fixed.pop("center", None)
        return {**fixed, "steps": self.steps, "seed": self.seed, "eval_every": self.eval_every,
                "task": dict(self.task.settings)}

    def _run(self, method: str, **weights: Any) -> TrainingRun:
        key = self._key(method, weights)
        if key not in self._cache:
            kwargs = {**self.settings, **weights} if method != "erm" else dict(self.settings)
            self._cache[key] = train_domains(self.task, method, steps=self.steps, seed=self.seed,
                                             eval_every=self.eval_every, **kwargs)
        return self._cache[key]

    def compute(self, method: str, alpha: float, beta: float, penalty_weight: float, anneal_steps: int) -> dict:
        name = METHOD_OPTIONS[method]
        aligned = self._run(name, alpha=alpha, beta=beta, penalty_weight=penalty_weight, anneal_steps=anneal_steps)
        erm = self._run("erm")
        return {"aligned": aligned, "erm": erm, "anneal_steps": anneal_steps,
                "test_accuracy": {r.name: r.final("test_accuracy") for r in (aligned, erm)},
                "test_gap": {r.name: r.final("hessian_gap_test") for r in (aligned, erm)}}

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 3.7))
        ax_acc, ax_gap, ax_pen = fig.subplots(1, 3)
        aligned, erm = result["aligned"], result["erm"]
        for run in (erm, aligned):
            color = COLORS[run.optimizer]
            ax_acc.plot(run.eval_steps, 100 * run.evals["test_accuracy"], color=color, label=f"{run.name}: held-out")
            ax_acc.plot(run.eval_steps, 100 * run.evals["train_accuracy"], color=color, ls="--",
                        label=f"{run.name}: training domains")
            ax_gap.semilogy(run.eval_steps, run.evals["hessian_gap_test"], color=color,
                            label=f"{run.name}: $\\max_e\\|H_e - H_{{test}}\\|_2$")
            ax_gap.semilogy(run.eval_steps, run.evals["hessian_gap_train"], color=color, ls=":",
                            label=f"{run.name}: $\\|H_1 - H_2\\|_2$")
        ax_acc.axhline(75, color="0.5", ls=":", lw=1, label="shape alone (75%)")
        ax_acc.set_ylim(0, 100)
        ax_acc.set_xlabel("training steps")
        ax_acc.set_ylabel("accuracy (%)")
        acc = result["test_accuracy"]
        ax_acc.set_title(f"held-out accuracy: {aligned.name} {100 * acc[aligned.name]:.0f}%, "
                         f"ERM {100 * acc['ERM']:.0f}%", fontsize=9)
        ax_acc.legend(fontsize=7, loc="center right")
        ax_gap.set_xlabel("training steps")
        ax_gap.set_ylabel("spectral norm (exact, float64)")
        ax_gap.set_title("head-Hessian gaps (the paper's transfer bound)", fontsize=9)
        ax_gap.legend(fontsize=7)
        steps = np.arange(1, len(aligned.per_step["hessian_term"]) + 1)
        ax_pen.semilogy(steps, aligned.per_step["hessian_term"], color=COLORS[aligned.optimizer], lw=0.8,
                        label="Hessian term (before alpha)")
        ax_pen.semilogy(steps, aligned.per_step["gradient_term"], color="0.4", lw=0.8,
                        label="gradient term (before beta)")
        ax_pen.axvline(result["anneal_steps"], color="k", ls=":", lw=1, label="penalty weight switched on")
        ax_pen.set_xlabel("training steps")
        ax_pen.set_ylabel("mean over domains of the squared distance")
        ax_pen.set_title(f"{aligned.name}'s penalty terms on each step's batches", fontsize=9)
        ax_pen.legend(fontsize=7)
        fig.tight_layout()
        return fig
