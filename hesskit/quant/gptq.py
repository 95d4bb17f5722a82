"""GPTQ: second-order post-training quantization, one layer at a time, with error compensation.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (official code: github.com/IST-DASLab/gptq, `gptq.py`).

Each layer solves the layer-wise reconstruction problem of OBQ (Frantar & Alistarh, "Optimal Brain
Compression", NeurIPS 2022): find grid values Q close to the weights W (rows, cols) in the sense of

    ||W X - Q X||^2 = 1/2 sum_rows (w - q)^T H (w - q),      H = 2 X X^T  (cols x cols),

where the columns of X are the layer's N calibration inputs. H is shared by every row. Quantizing
column j of every row moves it by w_j - q_j; the optimal update of the columns not yet quantized
(Optimal Brain Surgeon, Hassibi & Stork 1993) and the loss it leaves are

    delta = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j, F},       loss_j = (w_j - q_j)^2 / (2 [H_F^-1]_jj),

with F the set of columns not yet quantized. GPTQ quantizes the columns in one fixed order for all
rows, so the inverses H_F^-1 of the shrinking sets F are the same for every row, and row j of the
upper Cholesky factor U of H^-1 (H^-1 = U^T U) holds all of them: [H_F^-1]_{j, F} = U_jj U_{j, F}.
The update is then W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:], and H^-1 is never downdated
(issue IST-DASLab/gptq#21). Updates are applied lazily, block_size (128) columns at a time.

Details follow the official `gptq.py` / `quant.py`:
* H is a running mean of 2 x x^T over the calibration inputs (one x per row of a Linear's or a
  Conv1D's input, one per patch of a Conv2d's input, via `nn.functional.unfold`). The official
  code divides by the number of sequences rather than tokens; constant factors cancel (issue #51).
* Dead inputs (diag H = 0) get H_jj = 1 and W[:, j] = 0.
* Damping: `damping` x mean(diag H) is added to the diagonal (`percdamp=.01`) before inverting. The
  grids and the reported losses use the damped H only through H^-1.
* Grids: asymmetric min-max per output row by default (the official default; `symmetric=True` gives
  hesskit's HAWQ-style symmetric grid, see `hesskit.quant.fake.grid`; the official `--sym` grid is the same
  with the scale 2 max|w| / (2^b - 1)). The row grids are computed from the weights before the dead
  columns are zeroed, as the official code does. GPTQ and round-to-nearest share `grid` and
  `round_to_grid`, so they differ only in the compensation.
* `group_size`: a new grid per row for each group of `group_size` columns, computed when the
  group's first column is reached, from the weights as updated by every column quantized before
  (the not-yet-quantized weights). The official code reads them from its lazily updated matrix, which
  misses the updates of the earlier columns of the current block when a group starts inside a block
  (group_size not a multiple of block_size); hesskit applies those first, so its result does not
  depend on block_size. When group_size does not divide the columns, the last group is smaller (as
  in the official loop, and in `hk.quant.fake_quantize`).
* Hugging Face's `Conv1D` (GPT-2) is the linear layer it is: GPTQ works on its (out, in) view
  (`hk.layers.linear_weight`) and writes the result back into the stored (in, out) weight. A fused
  projection such as GPT-2's `c_attn` ([Q | K | V] outputs) is one matrix with one layer Hessian,
  as in the official code; per-row grids are per output feature of Q, K or V.
* Calibration inputs are tensors (`model(x)`) or dicts (`model(**x)`: `input_ids`,
  `attention_mask`, ...); GPTQ needs no labels and never looks at the outputs.
* `act_order`: columns in descending diag(H), permuted back at the end. Without static groups (the
  official default, `--static-groups` off) a group is `group_size` consecutive columns in *that*
  order, and so is here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._batches import first_tensor
from .._copy import model_copy
from .._model import call_model
from .._checks import is_int, is_real
from ..progress import progress_bar
from ..layers import is_linear, linear_weight
from .._model import eval_mode
from .fake import (check_bits, grid, layer_weight, quantizable_layers, quantize_model, report_compression,
                   round_to_grid, unknown_layer_error)
from .._batches import is_pair

__all__ = ["gptq", "gptq_layer", "layer_hessian", "layer_inputs", "round_to_nearest", "gptq_layers"]

SUPPORTED = "nn.Linear, transformers' Conv1D and nn.Conv2d"
COVERAGE = ("GPTQ quantizes Linear, Conv1D and Conv2d weights (a tied weight goes with its first module); "
            "pass layers=[...] to choose layers yourself")


def is_supported(module: nn.Module) -> bool:
    """A layer GPTQ quantizes: nn.Linear, transformers' Conv1D or nn.Conv2d."""
    return is_linear(module) or isinstance(module, nn.Conv2d)


# ----------------------------------------------------------------------------- the algorithm
def gptq_layer(weight: Tensor, hessian: Tensor, bits: int, *, group_size: int | None = None,
               symmetric: bool = False, damping: float = 0.01, act_order: bool = False,
               block_size: int = 128) -> tuple[Tensor, Tensor]:
    """GPTQ on one weight matrix (rows, cols) with the layer Hessian H = 2 X X^T (cols, cols).

    Returns `(Q, losses)`: Q the quantized weight (a new tensor of weight's shape and dtype, every
    entry on its row's, or row-group's, grid) and `losses` (rows,), the sum over columns of
    (w_j - q_j)^2 / [H_F^-1]_jj / 2, i.e. 1/2 (w - q)^T H_damped (w - q) for each row, the
    layer-wise error GPTQ left (w: the row after dead columns are zeroed).

    Computes in float32, or float64 for float64 inputs. See the module docstring for the
    options and where they follow the official code (Frantar et al., ICLR 2023).
    """
    W, H = _check_layer_problem(weight, hessian, bits, group_size, symmetric, damping, act_order, block_size)
    rows, cols = W.shape
    scale, zero, qmin, qmax = grid(W, bits, symmetric)  # per row, before the dead columns (as official)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damping)  # H_damped^-1 = U^T U, U upper triangular

    Q, losses = torch.zeros_like(W), torch.zeros_like(W)
    starts = sorted(set(range(0, cols, block_size)) | set(range(0, cols, group_size or cols)))
    for i1, i2 in zip(starts, starts[1:] + [cols]):  # blocks; every group starts a block
        if group_size and i1 % group_size == 0:  # W[:, i1:] holds every earlier column's update
            scale, zero, qmin, qmax = grid(W[:, i1 : i1 + group_size], bits, symmetric)
        W1, err = W[:, i1:i2].clone(), W.new_zeros(rows, i2 - i1)
        for i in range(i2 - i1):
            j, w = i1 + i, W1[:, i]
            q = round_to_grid(w[:, None], scale, zero, qmin, qmax)[:, 0]
            Q[:, j], losses[:, j] = q, (w - q) ** 2 / U[j, j] ** 2 / 2
            err[:, i] = (w - q) / U[j, j]
            W1[:, i:] -= err[:, i : i + 1] * U[j : j + 1, j:i2]  # compensate inside the block now
        W[:, i2:] -= err @ U[i1:i2, i2:]  # ... and the later columns once per block (lazy batch)

    if act_order:
        inverse = torch.argsort(perm)
        Q, losses = Q[:, inverse], losses[:, inverse]
    return Q.to(weight.dtype), losses.sum(dim=1)


def _inverse_cholesky(H: Tensor, damping: float) -> Tensor:
    """The upper Cholesky factor U of (H + damping * mean(diag H) * I)^-1, i.e. H^-1 = U^T U."""
    H = H.clone()
    H.diagonal().add_(damping * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info != 0 or not torch.isfinite(U).all():
        raise ValueError(
            f"gptq: the Cholesky factorisation of the damped layer Hessian H + {damping:g} * mean(diag H) * I "
            f"(or of its inverse) failed: H is not numerically positive definite (singular or nearly so, e.g. "
            f"fewer calibration inputs than columns, or linearly dependent inputs); raise damping (e.g. 0.1) or "
            f"use more calibration samples")
    return U


# ----------------------------------------------------------------------------- the layer Hessian
def layer_inputs(layer: nn.Module, inputs: Tensor) -> Tensor:
    """The rows x that multiply the layer's weight (as `layer_weight(layer).flatten(1) @ x`): shape (N, cols).

    Linear and Conv1D: the input reshaped to (-1, in_features) (one row per token for sequences).
    Conv2d: one row per output position, the unfolded receptive field (`nn.functional.unfold`,
    the layer's padding, dilation and stride), so that `x @ weight.flatten(1).T` is the convolution
    without its bias."""
    if is_linear(layer):
        return inputs.reshape(-1, linear_weight(layer).shape[1])
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"layer: grouped convolutions (groups={layer.groups}) are not supported by GPTQ here; "
                             f"leave them out with `layers=`")
        if inputs.dim() == 3:
            inputs = inputs.unsqueeze(0)
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded = F.pad(inputs, layer._reversed_padding_repeated_twice, mode=mode)  # what the conv itself pads
        cols = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"layer: GPTQ supports {SUPPORTED}, got {type(layer).__name__}")


class _HessianHook:
    """A forward hook that keeps H = 2/N sum_n x_n x_n^T as a running mean (the official `add_batch`)."""

    def __init__(self, layer: nn.Module):
        cols = layer_weight(layer)[0].numel()
        dtype = torch.promote_types(layer.weight.dtype, torch.float32)
        self.layer, self.count = layer, 0
        self.H = torch.zeros(cols, cols, dtype=dtype, device=layer.weight.device)

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = layer_inputs(self.layer, args[0].detach()).to(self.H.dtype)
        n = x.shape[0]
        if n == 0:
            return
        self.H *= self.count / (self.count + n)
        self.count += n
        self.H += (2 / self.count) * (x.T @ x)


def _calibration_batches(calibration_inputs: Any) -> list[Any]:
    """A tensor or a dict of inputs (one batch), one (inputs, targets) tuple (its inputs), or an
    iterable of batches (a tuple or list batch, e.g. (x, y) from a DataLoader, contributes its first
    element), as a list that can be replayed once per layer. Batches with no samples are dropped."""
    if isinstance(calibration_inputs, (Tensor, Mapping)):
        batches = [calibration_inputs]
    elif isinstance(calibration_inputs, tuple) and is_pair(calibration_inputs):  # not its targets as inputs
        batches = [calibration_inputs[0]]
    elif isinstance(calibration_inputs, Iterable) and not isinstance(calibration_inputs, (str, bytes)):
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration_inputs]
    else:
        raise TypeError(f"calibration_inputs: expected a tensor or dict of inputs, or an iterable of input "
                        f"batches, got {type(calibration_inputs).__name__}")
    batches = [b for b in batches if not _is_empty(b)]
    if not batches:
        raise ValueError("calibration_inputs: expected at least one calibration input, got none (empty)")
    return batches


def _is_empty(batch: Any) -> bool:
    t = first_tensor(batch)
    return t is not None and t.dim() > 0 and t.shape[0] == 0


def _run(model: nn.Module, batches: list[Any]) -> None:
    """Forward every batch (`model(x)`, or `model(**x)` for a dict) in eval mode without gradients;
    each module's mode is restored after."""
    with torch.no_grad(), eval_mode(model):
        for b in batches:
            call_model(model, b)


def _hessians(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any]) -> dict[str, Tensor]:
    hooks = {name: _HessianHook(layer) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(hooks[name]) for name, layer in layers.items()]
    try:
        _run(model, batches)
    finally:
        for h in handles:
            h.remove()
    for name, hook in hooks.items():
        if hook.count == 0:
            raise ValueError(f"layer {name!r}: received no input from calibration_inputs (is it used in forward?)")
    return {name: hook.H for name, hook in hooks.items()}


def layer_hessian(model: nn.Module, layer: str | nn.Module, calibration_inputs: Any) -> Tensor:
    """H = 2/N sum_n x_n x_n^T (cols, cols) for one Linear, Conv1D or Conv2d layer of `model`, x_n the
    rows of `layer_inputs` collected by a forward hook while `model` runs on `calibration_inputs` (a
    tensor or dict of inputs, or an iterable of batches), in eval mode and without gradients. `layer`
    is a module name or the module itself. The model is not modified (its modes are restored)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"layer: {layer!r} is not a module of the model; its Linear/Conv1D/Conv2d layers are "
                             f"{list(_supported_layers(model))}")
        name, module = layer, modules[layer]
    elif isinstance(layer, nn.Module):
        name = next((n for n, m in model.named_modules() if m is layer), None)
        if name is None:
            raise ValueError("layer: the given module is not part of the model")
        module = layer
    else:
        raise TypeError(f"layer: expected a module name or an nn.Module, got {type(layer).__name__}")
    if not is_supported(module):
        raise TypeError(f"layer: GPTQ supports {SUPPORTED}, got {type(module).__name__} ({name!r})")
    return _hessians(model, {name: module}, _calibration_batches(calibration_inputs))[name]


# ----------------------------------------------------------------------------- whole models
def _supported_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in quantizable_layers(model).items() if is_supported(m)}


def gptq_layers(model: nn.Module, layers: Iterable[str] | str | None = None) -> dict[str, nn.Module]:
    """The layers `gptq` quantizes, by name in model order: every Linear, Conv1D and Conv2d by default
    (Embeddings and other layers stay float), or those named in `layers`. A tied weight belongs to its
    first module (`hk.quant.quantizable_layers`): GPT-2's `lm_head` is the Embedding `transformer.wte`,
    so it stays float, as in the official code, which quantizes the transformer blocks only."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    available = _supported_layers(model)
    if layers is None:
        if not available:
            raise ValueError(f"model: has no Linear, Conv1D or Conv2d layer for GPTQ ({type(model).__name__})")
        return available
    names = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise unknown_layer_error("layers", unknown, model, available, "Linear/Conv1D/Conv2d")
    if not names:
        raise ValueError("layers: expected at least one layer name, got none")
    return {n: m for n, m in available.items() if n in names}


def gptq(model: nn.Module, calibration_inputs: Any, bits: int, *, group_size: int | None = None,
         symmetric: bool = False, damping: float = 0.01, act_order: bool = False, block_size: int = 128,
         layers: Iterable[str] | str | None = None, progress: bool = False) -> nn.Module:
    """A copy of `model` with its Linear, Conv1D and Conv2d weights quantized by GPTQ (Frantar et al., ICLR 2023).

    Sequential, as the official code: the layers are quantized in model order, and each layer's
    Hessian H = 2 X X^T comes from `calibration_inputs` run through the copy whose earlier layers
    are already quantized, so each layer is fitted to the inputs it will receive (its target is
    still W X on those inputs; the earlier layers' errors are not undone).
    `calibration_inputs`: a tensor or dict of inputs (no labels: GPTQ needs none), one (x, y) tuple,
    or an iterable of input batches ((x, y) pairs contribute x); the forward passes run in eval
    mode. `layers`: names of the layers to quantize (default: `gptq_layers`, every Linear, Conv1D
    and Conv2d; Embeddings stay float). The other options are `gptq_layer`'s; defaults follow the
    official code (asymmetric per-row grids, percdamp 0.01, blocksize 128, no groups, no act-order),
    each kept after a measurement (test loss, 15 models: notebook 11's and 14's digits MLPs, a
    digits CNN, notebook 12's transformer and a 2-block GPT-2 character LM, three seeds each; mean
    increase over the float model at 2 bits with the defaults 0.055, round-to-nearest on the same
    grid 0.45):
        symmetric=False: the symmetric grid gave 0.23 at 2 bits (0.017 against 0.007 at 3).
        damping=0.01: 0.001 and 0.1 gave 0.061 and 0.056, each better on at most 8 of the 15.
        act_order=False: act-order gave 0.049 at 2 bits and 0.006 against 0.007 at 3, but was
            better on only 8 and 6 of the 15 models (at 2 bits: 5 of the 6 transformers, 3 of
            the 9 MLPs and CNNs): a small mean gain, not a consistent one. With `group_size` it
            was better on 13 of 15 at 2 bits: pass `act_order=True` with groups (GPTQ's README
            does, with groups of 128, for LLaMA).
        block_size=128: changes only the speed here, not the result (see the module docstring).
        group_size=None: one grid per row; groups of 32 lowered the 2-bit increase to 0.049 for
            0.3-0.4 more bits per weight of scales and zero points (0.029 with act-order).
    Checked on the held-out digits MLP (three seeds): 2-bit test loss 0.036 above float (RTN 0.43).
    Biases stay float.
    `model` is not modified; the copy keeps its train/eval mode and requires_grad flags, and carries
    `.compression` (`hk.quant.CompressionReport`: the layers quantized, the weights left float);
    with the default `layers` the latter are also named in an `UncompressedWarning`.
    `progress=True` shows a bar of the layers quantized.
    """
    targets = gptq_layers(model, layers)
    check_bits(bits, symmetric)
    _check_options(group_size, damping, act_order, block_size)
    batches = _calibration_batches(calibration_inputs)
    clone = model_copy(model)
    chosen = {n: m for n, m in quantizable_layers(clone).items() if n in targets}
    with torch.no_grad(), progress_bar(progress, len(chosen), "GPTQ", unit="layer") as bar:
        for name, layer in chosen.items():
            bar.set_postfix_str(name)
            H = _hessians(clone, {name: layer}, batches)[name]
            try:
                Q, _ = gptq_layer(layer_weight(layer).flatten(1), H, bits, group_size=group_size, symmetric=symmetric,
                                  damping=damping, act_order=act_order, block_size=block_size)
            except ValueError as error:
                raise ValueError(f"layer {name!r}: {error}") from error
            layer_weight(layer).copy_(Q.reshape(layer_weight(layer).shape))
            bar.update()
    return report_compression(clone, "gptq", chosen, warn=layers is None, why=COVERAGE,
                              details=dict(bits=bits, group_size=group_size, symmetric=symmetric, damping=damping,
                                           act_order=act_order))


def round_to_nearest(model: nn.Module, bits: int, *, group_size: int | None = None, symmetric: bool = False,
                     layers: Iterable[str] | str | None = None) -> nn.Module:
    """The baseline GPTQ is compared with (the official `--nearest`): a copy whose `gptq_layers` are
    rounded to the nearest point of the same grids `gptq` uses (one per row, or per row and group of
    `group_size` columns), without compensation: `hk.quant.quantize_model` with its default grid
    (granularity None: per channel, or column groups of `group_size`; asymmetric) on the same
    layers; `.compression` and the warning as `gptq`'s."""
    targets = gptq_layers(model, layers)
    check_bits(bits, symmetric)
    _check_options(group_size, 0.0, False, 1)
    clone = quantize_model(model, {n: bits for n in targets}, None, group_size, symmetric)
    return report_compression(clone, "round_to_nearest", gptq_layers(clone, list(targets)), warn=layers is None,
                              why=COVERAGE, details=dict(bits=bits, group_size=group_size, symmetric=symmetric))


# ----------------------------------------------------------------------------- checks
def _check_options(group_size: Any, damping: Any, act_order: Any, block_size: Any) -> None:
    if group_size is not None and (not is_int(group_size) or group_size <= 0):
        raise ValueError(f"group_size: expected None or a positive integer, got {group_size!r}")
    if not is_real(damping) or not 0 <= damping < float("inf"):
        raise ValueError(f"damping: expected a finite number >= 0 (a fraction of mean(diag H), e.g. 0.01), "
                         f"got {damping!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order: expected True or False, got {act_order!r}")
    if not is_int(block_size) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive integer, got {block_size!r}")


def _check_layer_problem(weight: Any, hessian: Any, bits: Any, group_size: Any, symmetric: Any, damping: Any,
                         act_order: Any, block_size: Any) -> tuple[Tensor, Tensor]:
    """Validated float copies of (weight, hessian) in the working dtype (float32, or float64)."""
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty 2-D tensor (rows, cols), got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian: expected shape ({cols}, {cols}) for a weight with {cols} columns, "
                         f"got {tuple(hessian.shape)}")
    check_bits(bits, symmetric)
    _check_options(group_size, damping, act_order, block_size)
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError("weight, hessian: expected finite values, got inf or nan")
    dtype = torch.promote_types(torch.promote_types(weight.dtype, hessian.dtype), torch.float32)
    return weight.detach().to(dtype, copy=True), hessian.detach().to(dtype, copy=True)
