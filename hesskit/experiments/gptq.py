"""Notebook 14 (`14_gptq.ipynb`): GPTQ, second-order post-training quantization, against round-to-nearest.

GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023) quantizes a layer's weight column by column and
moves the rounding error of each column onto the columns not yet quantized, using the inverse of the
layer Hessian H = 2 X X^T of the reconstruction error ||W X - Q X||^2 (`hk.quant.gptq`). This module
holds what the notebook measures, as pure functions that take a model and data (so that benchmarks
can reuse them): a seeded digits MLP (`trained_digits`, a `tasks.TrainedModel`; scored by
`hesskit.experiments.tasks.evaluate`), GPTQ against round-to-nearest (RTN) on the same grids
(`gptq_vs_rtn`), the per-layer reconstruction error (`layer_errors`), sweeps over one GPTQ option
(`gptq_sweep`). The explorer is
`hesskit.widgets.gptq.GPTQExplorer`.

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

from .. import progress
from .._model import eval_mode
from ..data import digits
from ..quant.gptq import gptq, gptq_layers, layer_inputs, round_to_nearest
from .tasks import TrainedModel, digits_mlp, evaluate, trained_classifier

__all__ = [
    "trained_digits",
    "layer_errors",
    "Comparison",
    "gptq_vs_rtn",
    "Sweep",
    "gptq_sweep",
]

# --------------------------------------------------------------------------- the task
def trained_digits(seed: int = 0, hidden: tuple[int, ...] = (128, 64), activation: str = "relu", steps: int = 1500,
                   lr: float = 2e-3, batch_size: int = 64) -> TrainedModel:
    """`tasks.digits_mlp(hidden, activation, seed)` trained by `tasks.trained_classifier` with Adam
    (lr 2e-3, batches of 64 drawn with replacement, seeded by `seed`, `steps` steps) on 80% of the
    digits (split by `seed`), returned as a `tasks.TrainedModel` in eval mode (its `train` is the
    calibration pool: `calibration(n)` is its first n inputs; the defaults: a 64-128-64-10 MLP,
    above 90% test accuracy, trained in about a second on one core). Score it with `tasks.evaluate`."""
    train, test = digits(flatten=True, seed=seed)
    return trained_classifier(digits_mlp(hidden, activation, seed), train, test, steps, lr, batch_size=batch_size,
                              seed=seed, hidden=tuple(hidden), activation=activation)


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
    try:
        with eval_mode(quantized):
            quantized(inputs)
    finally:
        for h in handles:
            h.remove()
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
    dense = evaluate(model, test)
    out = Comparison(list(bits_list), dense.percent, dense.loss, [], [], [], [], [], [], [])
    for k, bits in enumerate(bits_list, start=1):
        rtn = round_to_nearest(model, bits, **rtn_keys)
        start = time.perf_counter()
        quant = gptq(model, calib, bits, **options)
        out.seconds.append(time.perf_counter() - start)
        for acc, loss, errs, q in ((out.rtn_accuracy, out.rtn_loss, out.rtn_errors, rtn),
                                   (out.gptq_accuracy, out.gptq_loss, out.gptq_errors, quant)):
            metrics = evaluate(q, test)
            acc.append(metrics.percent), loss.append(metrics.loss)
            errs.append(layer_errors(model, q, test[0], rtn_keys.get("layers")))
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
        metrics = evaluate(quant, test)
        sweep.accuracy.append(metrics.percent), sweep.loss.append(metrics.loss)
        sweep.errors.append(layer_errors(model, quant, test[0], kwargs.get("layers")))
    progress.report(len(values), len(values), option)
    return sweep
