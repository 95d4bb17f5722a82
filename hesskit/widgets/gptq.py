"""Notebook 14: GPTQ, second-order post-training quantization, against round-to-nearest.

GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023) quantizes a layer's weight column by column and
moves the rounding error of each column onto the columns not yet quantized, using the inverse of the
layer Hessian H = 2 X X^T of the reconstruction error ||W X - Q X||^2 (`hk.quant.gptq`). This module
holds what the notebook measures, as pure functions that take a model and data (so that benchmarks
can reuse them): a seeded digits MLP, test accuracy and loss, GPTQ against round-to-nearest (RTN) on
the same grids, the per-layer reconstruction error, sweeps over one GPTQ option; then the widget.

References: Frantar et al., ICLR 2023 (GPTQ); Frantar & Alistarh, "Optimal Brain Compression",
NeurIPS 2022 (OBQ); Hassibi & Stork, "Second order derivatives for network pruning: Optimal brain
surgeon", NeurIPS 1993.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import digits
from ..models import MLP
from ..quant.gptq import gptq, gptq_layers, layer_inputs, round_to_nearest
from .explorer import Explorer
from .. import progress

__all__ = [
    "GPTQExplorer",
    "DigitsTask",
    "digits_task",
    "evaluate",
    "Comparison",
    "gptq_vs_rtn",
    "layer_errors",
    "Sweep",
    "gptq_sweep",
]

CRITERION = nn.CrossEntropyLoss()
COLORS = {"float": "tab:gray", "RTN": "tab:red", "GPTQ": "tab:blue"}


# --------------------------------------------------------------------------- the task
@dataclass
class DigitsTask:
    """A trained digits classifier with its data: `train` (the calibration pool: its first n inputs
    are a random sample, since the split is a seeded permutation) and `test` (x, y)."""

    model: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    seed: int

    def calibration(self, num_samples: int) -> Tensor:
        """The first `num_samples` training inputs (no labels: GPTQ needs none)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
        if num_samples > len(self.train[0]):
            raise ValueError(f"num_samples: expected at most {len(self.train[0])} (the training set), "
                             f"got {num_samples}")
        return self.train[0][:num_samples]


def digits_task(seed: int = 0, hidden: tuple[int, ...] = (128, 64), activation: str = "relu", steps: int = 1500,
                lr: float = 2e-3, batch_size: int = 64) -> DigitsTask:
    """`hk.models.MLP(64, hidden, 10, activation)` trained with Adam (lr 2e-3, batches of 64 drawn
    with replacement, `steps` steps) on 80% of the digits (split by `seed`), returned in eval mode
    (the defaults: a 64-128-64-10 MLP, above 90% test accuracy, trained in about a second on one core)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    (x, y), test = digits(flatten=True, seed=seed)
    torch.manual_seed(seed)
    model = MLP(64, tuple(hidden), 10, activation)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        opt.zero_grad()
        CRITERION(model(x[idx]), y[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return DigitsTask(model.eval(), (x, y), test, seed)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) of `model` on one batch (x, y), in eval mode (the
    model's modes are restored)."""
    x, y = data
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        logits = model(x)
    finally:
        for m, training in modes:
            m.train(training)
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), CRITERION(logits, y).item()


# --------------------------------------------------------------------------- measurements
@torch.no_grad()
def layer_errors(model: nn.Module, quantized: nn.Module, inputs: Tensor,
                 layers: Sequence[str] | None = None) -> dict[str, float]:
    """Relative layer-wise reconstruction error ||W X - Q X||^2 / ||W X||^2 of each GPTQ layer
    (default: every Linear and Conv2d), with W the float weight of `model`, Q the weight of
    `quantized`, and X the inputs that reach the layer when `quantized` runs on `inputs` (the
    objective GPTQ minimises for each layer, here on whatever inputs are passed: use held-out ones
    to see how it generalises)."""
    names = list(gptq_layers(model, layers))
    float_layers, quant_layers = dict(model.named_modules()), dict(quantized.named_modules())
    missing = [n for n in names if n not in quant_layers]
    if missing:
        raise ValueError(f"quantized: has no layers {missing}; expected a quantized copy of model")
    captured: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = [quant_layers[n].register_forward_hook(
        lambda module, args, out, n=n: captured[n].append(layer_inputs(module, args[0]))) for n in names]
    modes = [(m, m.training) for m in quantized.modules()]
    quantized.eval()
    try:
        quantized(inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.train(training)
    errors = {}
    for n in names:
        X = torch.cat(captured[n]).double()
        W = float_layers[n].weight.flatten(1).double()
        Q = quant_layers[n].weight.flatten(1).double()
        errors[n] = ((X @ (W - Q).T).pow(2).sum() / (X @ W.T).pow(2).sum().clamp(min=1e-300)).item()
    return errors


@dataclass
class Comparison:
    """GPTQ against round-to-nearest on the same grids, for each bit width in `bits`.

    Accuracies in %, losses are the test cross-entropy; `rtn_errors` / `gptq_errors` are
    `layer_errors` on the test inputs, one dict per bit width; `seconds` is GPTQ's wall time."""

    bits: list[int]
    float_accuracy: float
    float_loss: float
    rtn_accuracy: list[float]
    rtn_loss: list[float]
    gptq_accuracy: list[float]
    gptq_loss: list[float]
    rtn_errors: list[dict[str, float]] = field(repr=False)
    gptq_errors: list[dict[str, float]] = field(repr=False)
    seconds: list[float] = field(repr=False)


def gptq_vs_rtn(model: nn.Module, calib: Any, test: tuple[Tensor, Tensor], bits_list: Sequence[int] = (2, 3, 4),
                **options: Any) -> Comparison:
    """`hk.quant.gptq(model, calib, bits, **options)` and `round_to_nearest` with the same grids
    (`group_size`, `symmetric`, `layers` from options) at each bit width, evaluated on `test`."""
    if not len(bits_list):
        raise ValueError("bits_list: expected at least one bit width, got none")
    rtn_keys = {k: options[k] for k in ("group_size", "symmetric", "layers") if k in options}
    fp_acc, fp_loss = evaluate(model, test)
    out = Comparison(list(bits_list), fp_acc, fp_loss, [], [], [], [], [], [], [])
    for k, bits in enumerate(bits_list, start=1):
        rtn = round_to_nearest(model, bits, **rtn_keys)
        start = time.perf_counter()
        quant = gptq(model, calib, bits, **options)
        out.seconds.append(time.perf_counter() - start)
        for acc, loss, errs, q in ((out.rtn_accuracy, out.rtn_loss, out.rtn_errors, rtn),
                                   (out.gptq_accuracy, out.gptq_loss, out.gptq_errors, quant)):
            a, l = evaluate(q, test)
            acc.append(a), loss.append(l), errs.append(layer_errors(model, q, test[0], rtn_keys.get("layers")))
        progress.report(k, len(bits_list), "bit width")  # shown while an explorer renders
    return out


@dataclass
class Sweep:
    """GPTQ's test accuracy, loss and `layer_errors` on the test inputs as one option takes `values`
    (nan, an empty dict and the message in `failures` where GPTQ raised, e.g. a Cholesky failure)."""

    option: str
    values: list[Any]
    accuracy: list[float]
    loss: list[float]
    errors: list[dict[str, float]] = field(default_factory=list, repr=False)
    failures: dict[int, str] = field(default_factory=dict)

    def total_error(self) -> np.ndarray:
        """The sum over layers of the relative reconstruction errors, for each value (nan if it failed)."""
        return np.array([sum(e.values()) if e else math.nan for e in self.errors])


def gptq_sweep(model: nn.Module, calib: Tensor, test: tuple[Tensor, Tensor], bits: int, option: str,
               values: Sequence[Any], **options: Any) -> Sweep:
    """GPTQ at `bits` with `option` set to each of `values` (the other options fixed by `options`).
    `option="calibration_samples"` uses the first v inputs of `calib` instead; any other option is
    a keyword of `hk.quant.gptq`. A ValueError from GPTQ is recorded, not raised."""
    keywords = ("group_size", "symmetric", "damping", "act_order", "block_size", "layers", "calibration_samples")
    if option not in keywords:
        raise ValueError(f"option: expected one of {keywords}, got {option!r}")
    sweep = Sweep(option, list(values), [], [])
    for i, v in enumerate(values):
        progress.report(i, len(values), option)  # shown while an explorer renders: one unit per value
        if option == "calibration_samples":
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= len(calib):
                raise ValueError(f"values: calibration sizes must be integers in 1..{len(calib)}, got {v!r}")
            data, kwargs = calib[:v], options
        else:
            data, kwargs = calib, {**options, option: v}
        try:
            quant = gptq(model, data, bits, **kwargs)
        except ValueError as error:
            sweep.failures[i] = str(error)
            sweep.accuracy.append(math.nan), sweep.loss.append(math.nan), sweep.errors.append({})
            continue
        acc, loss = evaluate(quant, test)
        sweep.accuracy.append(acc), sweep.loss.append(loss)
        sweep.errors.append(layer_errors(model, quant, test[0], kwargs.get("layers")))
    progress.report(len(values), len(values), option)
    return sweep


# --------------------------------------------------------------------------- the widget
class GPTQExplorer(Explorer):
    """GPTQ against round-to-nearest on a trained digits MLP: bits, group size, damping, act order,
    number of calibration samples and grid type; test accuracy and loss of the float, RTN and GPTQ
    models, and each layer's relative reconstruction error on the test inputs."""

    CALIBRATION = (16, 32, 64, 128, 256, 512, 1024)

    def __init__(self, task: DigitsTask | None = None, bits: int = 2, group_size: int | None = None,
                 damping: float = 0.01, act_order: bool = False, calibration_samples: int = 128,
                 symmetric: bool = False):
        import ipywidgets as widgets

        self.task = digits_task() if task is None else task
        self.float_result = evaluate(self.task.model, self.task.test)
        self._rtn: dict[tuple, tuple] = {}
        pool = len(self.task.train[0])
        sizes = [n for n in self.CALIBRATION if n <= pool]
        if calibration_samples not in sizes:
            raise ValueError(f"calibration_samples: expected one of {sizes}, got {calibration_samples!r}")
        widths = [layer.weight[0].numel() for layer in gptq_layers(self.task.model).values()]
        groups = [("per row", 0)] + [(str(g), g) for g in (32, 16, 8) if all(w % g == 0 for w in widths)]
        if (group_size or 0) not in [g for _, g in groups]:
            raise ValueError(f"group_size: expected one of {[g or None for _, g in groups]}, got {group_size!r}")
        style = {"description_width": "initial"}
        super().__init__({
            "bits": widgets.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False,
                                      style=style),
            "group_size": widgets.Dropdown(options=groups, value=group_size or 0, description="group size",
                                           style=style, layout={"width": "170px"}),
            "damping": widgets.FloatLogSlider(value=damping, base=10, min=-4, max=0, step=0.5,
                                              description="damping", readout_format=".0e",
                                              continuous_update=False, style=style),
            "act_order": widgets.ToggleButtons(options=[("natural order", False), ("act order", True)],
                                               value=act_order, description="columns", style=style),
            "calibration_samples": widgets.SelectionSlider(options=sizes, value=calibration_samples,
                                                           description="calibration samples",
                                                           continuous_update=False, style=style),
            "symmetric": widgets.ToggleButtons(options=[("asymmetric", False), ("symmetric", True)],
                                               value=symmetric, description="grid", style=style),
        })

    def compute(self, bits: int, group_size: int, damping: float, act_order: bool, calibration_samples: int,
                symmetric: bool) -> dict:
        task, group = self.task, (group_size or None)
        key = (bits, group, symmetric)
        if key not in self._rtn:  # RTN depends on neither damping, order nor calibration
            rtn = round_to_nearest(task.model, bits, group_size=group, symmetric=symmetric)
            self._rtn[key] = (*evaluate(rtn, task.test), layer_errors(task.model, rtn, task.test[0]))
        rtn_acc, rtn_loss, rtn_errors = self._rtn[key]
        start, failure = time.perf_counter(), None
        try:
            quant = gptq(task.model, task.calibration(calibration_samples), bits, group_size=group,
                         symmetric=symmetric, damping=damping, act_order=act_order)
            gptq_acc, gptq_loss = evaluate(quant, task.test)
            gptq_errors = layer_errors(task.model, quant, task.test[0])
        except ValueError as error:
            failure = str(error)
            gptq_acc = gptq_loss = math.nan
            gptq_errors = {name: math.nan for name in rtn_errors}
        return {
            "bits": bits, "group_size": group, "damping": float(damping), "act_order": act_order,
            "calibration_samples": calibration_samples, "symmetric": symmetric,
            "float_accuracy": self.float_result[0], "float_loss": self.float_result[1],
            "rtn_accuracy": rtn_acc, "rtn_loss": rtn_loss, "gptq_accuracy": gptq_acc, "gptq_loss": gptq_loss,
            "rtn_errors": rtn_errors, "gptq_errors": gptq_errors, "failure": failure,
            "seconds": time.perf_counter() - start,
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.3))
        ax_acc, ax_err = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
        fig.subplots_adjust(left=0.07, right=0.985, bottom=0.15, top=0.86, wspace=0.25)
        names = ["float", "RTN", "GPTQ"]
        accs = [result["float_accuracy"], result["rtn_accuracy"], result["gptq_accuracy"]]
        losses = [result["float_loss"], result["rtn_loss"], result["gptq_loss"]]
        bars = ax_acc.bar(names, [0 if math.isnan(a) else a for a in accs], color=[COLORS[n] for n in names])
        for bar, a, l in zip(bars, accs, losses):
            text = "failed" if math.isnan(a) else f"{a:.1f}%\nloss {l:.2f}"
            ax_acc.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0) + 1, text, ha="center",
                        va="bottom", fontsize=9)
        ax_acc.set_ylim(0, 122)
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_title("test accuracy (and cross-entropy)")

        layers = list(result["rtn_errors"])
        x = np.arange(len(layers))
        for offset, method in ((-0.2, "RTN"), (0.2, "GPTQ")):
            values = [result[f"{method.lower()}_errors"][n] for n in layers]
            ax_err.bar(x + offset, [v if v > 0 and math.isfinite(v) else np.nan for v in values], width=0.4,
                       color=COLORS[method], label=method)
        ax_err.set_yscale("log")
        ax_err.set_xticks(x, [f"layer {n}\n{tuple(self.task.model.get_submodule(n).weight.shape)}" for n in layers])
        ax_err.set_xlabel("layer (weight shape)")
        ax_err.set_ylabel(r"$\|WX - QX\|^2 / \|WX\|^2$ on test inputs")
        ax_err.set_title("layer-wise reconstruction error")
        ax_err.legend()
        if result["failure"]:
            ax_err.text(0.5, 0.5, "GPTQ failed:\n" + _wrap(result["failure"], 60), transform=ax_err.transAxes,
                        ha="center", va="center", fontsize=8, color="darkred",
                        bbox={"facecolor": "white", "edgecolor": "darkred"})
        grid = "symmetric" if result["symmetric"] else "asymmetric"
        groups = "per row" if result["group_size"] is None else f"groups of {result['group_size']} columns"
        fig.suptitle(f"{result['bits']}-bit {grid} grid, {groups}; GPTQ: damping {result['damping']:.0e}, "
                     f"{'act order' if result['act_order'] else 'natural order'}, "
                     f"{result['calibration_samples']} calibration samples ({result['seconds']:.2f} s)")
        return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
