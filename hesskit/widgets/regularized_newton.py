"""Notebook 17 (`17_regularized_newton.ipynb`): the regularized-Newton explorer, the gradient-
regularized Newton method's curvature, initial gamma and start point against a baseline on
logistic or softmax regression. What it runs lives in `hesskit.experiments.regularized_newton`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..experiments.regularized_newton import Problem, Run, logistic_problem, run, softmax_problem
from .explorer import Explorer

__all__ = ["RegularizedNewtonExplorer"]

PROBLEMS: dict[str, Callable[[float], Problem]] = {
    "logistic (breast cancer)": lambda distance: logistic_problem(distance=distance),
    "softmax (digits)": lambda distance: softmax_problem(distance=distance),
}
CURVATURES = {"Hessian": "hessian", "GGN": "ggn", "empirical Fisher": "fisher"}
BASELINES = {"Newton + line search": "newton-ls", "gradient descent": "gd", "Newton-CG": "newton-cg",
             "Newton, no line search": "newton", "none": None}


class RegularizedNewtonExplorer(Explorer):
    """The regularized Newton method's curvature, initial gamma and start distance against a
    baseline: f(x_k) - f* against iterations and against closure calls (loss and gradient
    evaluations), and the search's gamma, lambda and retries per step."""

    def __init__(self, problem: str = "logistic (breast cancer)", curvature: str = "empirical Fisher",
                 gamma: float = 1.0, distance: float = 10.0, baseline: str = "Newton + line search",
                 steps: int = 200, baseline_steps: dict[str, int] | None = None, stop_gap: float = 1e-12,
                 problems: dict[str, Callable[[float], Problem]] | None = None):
        import ipywidgets as widgets

        self.steps, self.stop_gap = steps, stop_gap
        self.baseline_steps = {"gd": 3000, "newton": 30, **(baseline_steps or {})}
        self.problems = dict(PROBLEMS if problems is None else problems)
        self._problems: dict[tuple, Problem] = {}
        self._cache: dict[tuple, Run] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "problem": widgets.Dropdown(options=list(self.problems), value=problem, description="problem", style=style),
            "curvature": widgets.ToggleButtons(options=list(CURVATURES), value=curvature, description="H~",
                                               style=style),
            "gamma": widgets.FloatLogSlider(value=gamma, base=10, min=-4, max=4, step=0.5, description="initial gamma",
                                            readout_format=".0e", continuous_update=False, style=style),
            "distance": widgets.FloatLogSlider(value=distance, base=10, min=-1, max=3, step=0.5,
                                               description="start: distance from 0", readout_format=".2g",
                                               continuous_update=False, style=style),
            "baseline": widgets.Dropdown(options=list(BASELINES), value=baseline, description="baseline",
                                         style=style),
        })

    def _problem(self, name: str, distance: float) -> Problem:
        key = (name, f"{distance:.6g}")
        if key not in self._problems:
            self._problems[key] = self.problems[name](distance)
        return self._problems[key]

    def _run(self, problem: Problem, name: str, distance: float, method: str, steps: int, **kwargs) -> Run:
        key = (name, f"{distance:.6g}", method, steps, tuple(sorted(kwargs.items())))
        if key not in self._cache:
            self._cache[key] = run(problem, method, steps, stop_gap=self.stop_gap, **kwargs)
        return self._cache[key]

    def compute(self, problem: str, curvature: str, gamma: float, distance: float, baseline: str) -> dict:
        p = self._problem(problem, distance)
        method = f"regnewton-{CURVATURES[curvature]}"
        main = self._run(p, problem, distance, method, self.steps, gamma=float(gamma))
        base_method = BASELINES[baseline]
        base = (self._run(p, problem, distance, base_method, self.baseline_steps.get(base_method, self.steps))
                if base_method else None)
        runs = [r for r in (main, base) if r is not None]
        return {"main": main, "baseline": base, "runs": runs, "problem": p.name, "f_star": p.f_star,
                "initial_gap": float(main.gap[0]), "iterations": {r.label: r.iterations_to(1e-8) for r in runs},
                "closure_calls": {r.label: r.cost_to(1e-8) for r in runs}}

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 4.2))
        ax_it, ax_calls, ax_search = fig.subplots(1, 3)
        colors = {"main": "tab:red", "baseline": "tab:blue"}
        for key in ("main", "baseline"):
            r = result[key]
            if r is None:
                continue
            gap = np.maximum(r.gap, 1e-17)
            label = r.label + ("" if r.status == "ok" else f" ({r.status})")
            ax_it.semilogy(np.arange(len(gap)), gap, color=colors[key], lw=1.8, label=label)
            ax_calls.semilogy(r.closure_calls, gap, color=colors[key], lw=1.8, label=label)
        for ax, xlabel in ((ax_it, "iteration k"), (ax_calls, "closure calls (loss + gradient evaluations)")):
            ax.axhline(1e-8, color="k", ls=":", lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("f(x_k) - f*  (floored at 1e-17)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)

        def reached(counts: dict) -> str:
            return "\n".join(f"{k}: {v:.0f}" if np.isfinite(v) else f"{k}: never" for k, v in counts.items())

        ax_it.set_title(f"iterations to f - f* <= 1e-8\n{reached(result['iterations'])}", fontsize=8)
        ax_calls.set_title(f"closure calls to f - f* <= 1e-8\n{reached(result['closure_calls'])}", fontsize=8)
        main = result["main"]
        k = np.arange(1, main.steps + 1)
        ax_search.semilogy(k, main.per_step["gamma"], color="tab:green", lw=1.5, label="gamma (accepted)")
        ax_search.semilogy(k, main.per_step["lambda"], color="tab:purple", lw=1.5, label="lambda = ||g|| / gamma")
        retried = main.per_step["retries"] > 0
        if retried.any():
            ax_search.semilogy(k[retried], main.per_step["lambda"][retried], "k.", ms=4, label="step with retries")
        ax_search.set_xlabel("iteration k")
        ax_search.set_ylabel("gamma and lambda (log scale)")
        ax_search.set_title(f"the search of {main.label}\n{int(np.nansum(main.per_step['retries']))} retries in "
                            f"{main.steps} steps", fontsize=8)
        ax_search.grid(alpha=0.3, which="both")
        ax_search.legend(fontsize=7)
        fig.suptitle(f"{result['problem']}: start f - f* = {result['initial_gap']:.3g}", fontsize=9)
        fig.tight_layout()
        return fig
