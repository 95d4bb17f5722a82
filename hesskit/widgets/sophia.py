"""Notebook 07 (`07_sophia.ipynb`): the Sophia explorer, Sophia's lr, gamma, refresh interval and
estimator against a baseline on a tiny character language model. What it trains lives in
`hesskit.experiments.sophia`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..experiments.sophia import final_test_loss, train_lm
from ..experiments.tasks import Task, char_lm_task, unigram_entropy
from ..experiments.training import TrainingRun
from ..optim.sophia import DEFAULT_GAMMA
from .explorer import Explorer

__all__ = ["SophiaExplorer"]

BASELINES = {"AdamW": "adamw", "sign momentum": "sign", "none": None}
ESTIMATORS = {"Sophia-G (GNB)": "sophia-g", "Sophia-H (Hutchinson)": "sophia-h"}


class SophiaExplorer(Explorer):
    """Sophia's lr, gamma, refresh interval k and estimator, against a baseline at its own lr:
    held-out loss against steps and against seconds, and the win rate over training."""


    def __init__(self, task: Task | None = None, steps: int = 300, lr: float = 3e-3, gamma: float = 0.05,
                 update_every: int = 10, estimator: str = "Sophia-G (GNB)", baseline: str = "AdamW",
                 baseline_lrs: dict[str, float] | None = None, target: float | None = None,
                 lr_range: tuple[float, float] = (-4, -1), gamma_range: tuple[float, float] = (-3, 1),
                 max_update_every: int = 50, batch_size: int = 32, seed: int = 0):
        import ipywidgets as widgets

        self.task = char_lm_task(num_chars=30_000, length=32, dim=32, blocks=1, heads=4, mlp_ratio=4,
                                  stride=16) if task is None else task
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.baseline_lrs = {"AdamW": 3e-3, "sign momentum": 1e-3, **(baseline_lrs or {})}
        self.target = target
        self._cache: dict[tuple, TrainingRun] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "lr": widgets.FloatLogSlider(value=lr, base=10, min=lr_range[0], max=lr_range[1], step=0.25,
                                         description="Sophia lr", readout_format=".1e", continuous_update=False,
                                         style=style),
            "gamma": widgets.FloatLogSlider(value=gamma, base=10, min=gamma_range[0], max=gamma_range[1], step=0.25,
                                            description="gamma", readout_format=".2g", continuous_update=False,
                                            style=style),
            "update_every": widgets.IntSlider(value=update_every, min=1, max=max_update_every,
                                              description="refresh every k", continuous_update=False, style=style),
            "estimator": widgets.ToggleButtons(options=list(ESTIMATORS), value=estimator, description="estimator",
                                               style=style),
            "baseline": widgets.Dropdown(options=list(BASELINES), value=baseline, description="baseline",
                                         style=style),
        })

    @staticmethod
    def _key(name: str, lr: float, gamma: float | None, update_every: int, steps: int, batch_size: int,
             seed: int) -> tuple:
        sophia = name in ("sophia-g", "sophia-h")
        if sophia and gamma is None:
            gamma = DEFAULT_GAMMA["gnb" if name == "sophia-g" else "hutchinson"]
        return (name, f"{lr:.6g}", f"{gamma:.6g}" if sophia else None, update_every if sophia else None, steps,
                batch_size, seed)

    def add_runs(self, runs: Sequence[TrainingRun]) -> None:
        """Reuse runs trained elsewhere (e.g. a learning-rate sweep on the same task) instead of
        training them again; a run is used when its optimizer, lr, gamma, k, steps, batch size and
        seed match the controls'."""
        for r in runs:
            s = r.settings
            self._cache[self._key(r.optimizer, r.lr, s["gamma"], s["update_every"], s["steps"], s["batch_size"],
                                  s["seed"])] = r

    def _run(self, name: str, lr: float, gamma: float | None = None, update_every: int = 10) -> TrainingRun:
        key = self._key(name, lr, gamma, update_every, self.steps, self.batch_size, self.seed)
        if key not in self._cache:
            self._cache[key] = train_lm(self.task, name, lr, steps=self.steps, batch_size=self.batch_size,
                                        gamma=gamma, update_every=update_every, seed=self.seed)
        return self._cache[key]

    def compute(self, lr: float, gamma: float, update_every: int, estimator: str, baseline: str) -> dict:
        sophia = self._run(ESTIMATORS[estimator], lr, gamma, update_every)
        base_name = BASELINES[baseline]
        base = self._run(base_name, self.baseline_lrs[baseline]) if base_name else None
        if self.target is not None:
            target = self.target
        else:  # the loss the baseline (or Sophia) reaches by the end, so that "steps to target" is defined
            reference = base if base is not None and final_test_loss(base) < math.inf else sophia
            target = float(np.nanmin(reference.evals["test_loss"])) + 0.02
        runs = [r for r in (sophia, base) if r is not None]
        win_rate = sophia.per_step["win_rate"]
        finite = win_rate[np.isfinite(win_rate)]
        return {
            "sophia": sophia, "baseline": base, "runs": runs, "target": target,
            "steps_to": {r.label: r.steps_to(target, "test_loss") for r in runs},
            "seconds_to": {r.label: r.seconds_to(target, "test_loss") for r in runs},
            "mean_win_rate": float(finite.mean()) if len(finite) else math.nan,
            "unigram": unigram_entropy(self.task),
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12, 3.6))
        ax_steps, ax_time, ax_win = fig.subplots(1, 3)
        colors = {"sophia-g": "C0", "sophia-h": "C2", "adamw": "C1", "sign": "C7"}
        for run in result["runs"]:
            label = run.label + (" (diverged)" if run.diverged else "")
            ax_steps.plot(run.eval_steps, run.evals["test_loss"], color=colors[run.optimizer], label=label)
            ax_time.plot(run.eval_seconds(), run.evals["test_loss"], color=colors[run.optimizer], label=label)
        lowest = min(float(np.nanmin(r.evals["test_loss"])) for r in result["runs"])
        for ax in (ax_steps, ax_time):
            ax.axhline(result["target"], color="k", ls=":", lw=1, label=f"target {result['target']:.2f}")
            ax.axhline(result["unigram"], color="0.6", ls="--", lw=1,
                       label=f"unigram entropy {result['unigram']:.2f}")
            ax.set_ylabel("held-out loss (nats / character)")
            ax.set_ylim(max(lowest - 0.1, 0.0), result["unigram"] + 0.15)
        ax_steps.set_xlabel("optimizer steps")
        ax_time.set_xlabel("training wall-clock time (s)")
        ax_steps.legend(fontsize=7)
        sophia = result["sophia"]

        def reached(to: dict, fmt: str) -> str:
            return ", ".join(f"{r.name} {to[r.label]:{fmt}}" if math.isfinite(to[r.label]) else f"{r.name} never"
                             for r in result["runs"])

        ax_steps.set_title(f"steps to target: {reached(result['steps_to'], '.0f')}", fontsize=9)
        ax_time.set_title(f"seconds to target: {reached(result['seconds_to'], '.1f')}", fontsize=9)
        win_rate = sophia.per_step["win_rate"]
        steps = np.arange(1, len(win_rate) + 1)
        ax_win.plot(steps, win_rate, color=colors[sophia.optimizer], lw=0.8)
        ax_win.axhspan(0.1, 0.5, color="C0", alpha=0.08, label="0.1-0.5 (official README)")
        ax_win.set_ylim(-0.02, 1.02)
        ax_win.set_xlabel("optimizer steps")
        ax_win.set_ylabel("win rate (fraction unclipped)")
        ax_win.set_title(f"{sophia.name}: gamma {sophia.settings['gamma']:.2g}, k = {sophia.settings['update_every']}, "
                         f"mean win rate {result['mean_win_rate']:.2f}", fontsize=9)
        ax_win.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        return fig
