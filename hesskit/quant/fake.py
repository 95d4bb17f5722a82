"""Uniform fake quantization: grids, granularities, a straight-through estimator, size accounting.

A weight w is replaced by the nearest point of a uniform grid (Jacob et al., CVPR 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"):

    symmetric   s = max|w| / (2^(b-1) - 1),   q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   w_hat = s q
    asymmetric  s = (max(w, 0) - min(w, 0)) / (2^b - 1),  z = round(-min(w, 0) / s),
                q = clamp(round(w / s) + z, 0, 2^b - 1),   w_hat = s (q - z)

The range (max |w|, or min and max) is taken over a *group* of weights that shares one scale:

    "tensor"   one range for the whole tensor;
    "channel"  one range per output channel (row of w.flatten(1));
    "rows"     one range per block of `group_size` consecutive output rows: Q-BERT's group-wise
               quantization (Shen et al., AAAI 2020). For a fused attention projection whose rows are
               [Q heads | K heads | V heads], `group_size = dim // heads` gives one range per head;
    "columns"  inside each output row, one range per `group_size` consecutive input columns (GPTQ's
               and AWQ's "group size", e.g. g128).

When `group_size` does not divide the rows (columns), the last group is smaller, so one group size
can serve layers of different shapes.

Rows are output channels: a layer's weight is quantized as `layer_weight` gives it, (out, in) for
nn.Linear and for Hugging Face's `Conv1D` (GPT-2), which stores its weight transposed as (in, out).
For a Conv1D the rows are therefore the *columns* of the stored weight, so that "channel" means one
range per output feature for both. GPT-2's fused attention projection `c_attn` (stored (dim, 3 dim))
is quantized as one (3 dim, dim) matrix whose rows are [Q | K | V], each split into heads of
head_dim = dim / n_head consecutive rows (GPT-2 splits its output that way), so
`granularity="rows", group_size=head_dim` gives one range per head of Q, K and V.

Symmetric grids follow HAWQ (q in [-2^(b-1), 2^(b-1) - 1], s from max|w|); asymmetric grids force 0
into the range, as GPTQ's `find_params` does, so that 0 is exactly representable. A group whose
weights are all 0 gets scale 1 (it stays 0).

Defaults, the same in every function of `hk.quant` that takes a quantizer (`fake_quantize`,
`quantization_error`, `quantize_model`, `model_size`, `quantization_aware`, the sensitivities and
allocators), so that an allocation and the model quantized with it use one grid:

    granularity=None   one range per output channel ("channel"), or, when `group_size` is given,
                       per `group_size` consecutive input columns of each row ("columns", what GPTQ,
                       AWQ and `hk.quant.gptq` call the group size), so `quantize_model(model, 2,
                       group_size=8)` is GPTQ's g8 grid without its compensation. A tensor with fewer
                       than 2 dimensions has no channels and gets one range.
    symmetric=False    asymmetric min-max grids with 0 forced into the range (GPTQ's and AWQ's
                       default). HAWQ-V3 and Q-BERT use symmetric grids (integer-only kernels want
                       them): pass `symmetric=True` to follow them.

Both were measured with round-to-nearest on six trained classifiers (notebook 11's and 14's digits
MLPs, two seeds each, a digits CNN, notebook 12's transformer) and a 2-block GPT-2 character LM:
one range per tensor instead of per channel costs 10-39 points of test accuracy at 2 bits
(asymmetric grids; the LM's test loss 3.86 instead of 1.88 nats, float 0.71) for 0.2-0.5 bits per
weight of fp16 scales; the symmetric grid, which uses 2^b - 1 of its 2^b levels (at 2 bits it is
ternary, {-s, 0, s}), costs 11-54 points at 2 bits and 0-6 at 3 bits against the asymmetric one
per channel (the LM: 3.97 against 1.88 nats at 2 bits, 0.96 against 0.89 at 3), for one b-bit zero
point per range. At 4 bits per-channel grids of either kind stay within 1.5 points of the float
model (per tensor: up to 3), at 8 bits every choice does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._copy import model_copy
from .._model import eval_mode, requiring_grad
from .._checks import is_int
from ..layers import is_linear, linear_weight, parameter_owners, tied_names

__all__ = [
    "GRANULARITIES",
    "layer_weight",
    "is_quantizable",
    "owned_layers",
    "weight_users",
    "CompressionReport",
    "UncompressedWarning",
    "report_compression",
    "eval_mode",
    "requiring_grad",
    "grid",
    "round_to_grid",
    "fake_quantize",
    "ste_fake_quantize",
    "quantization_error",
    "quantizable_layers",
    "check_bits",
    "check_choices",
    "check_granularity",
    "default_granularity",
    "check_layers",
    "layer_bits",
    "LayerSwapper",
    "quantize_model",
    "ModelSize",
    "model_size",
    "ActivationQuantizer",
    "QuantizedLayer",
    "quantization_aware",
    "observe_activations",
    "freeze",
]

GRANULARITIES = ("tensor", "channel", "rows", "columns")


# ----------------------------------------------------------------------------- layers and reports
def layer_weight(layer: nn.Module) -> Tensor:
    """The weight as hesskit compresses it, output channels first: (out, in) for nn.Linear and
    transformers' Conv1D (`hk.layers.linear_weight`: for a Conv1D the transposed view of its stored
    (in, out) weight, so writing into it writes the layer), the stored weight otherwise (Conv:
    (out, in / groups, *kernel); Embedding: (num_embeddings, dim), one row per token)."""
    return linear_weight(layer) if is_linear(layer) else layer.weight


def owned_layers(model: nn.Module, accept: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """The modules of `model` that `accept` and that own a weight, by name in model order.

    A weight shared by several modules (tied: GPT-2's `lm_head.weight` *is* `transformer.wte.weight`)
    belongs to the first module that holds it, the module of the name `model.named_parameters()`
    reports (`hk.layers.tied_names`' canonical name). It is listed once, under that module's name,
    and only if `accept` takes that module: GPT-2's tied matrix is the Embedding `transformer.wte`,
    and `lm_head` is never listed. Compressing it compresses every module that uses it."""
    aliases = tied_names(model)
    return {name: m for name, m in model.named_modules()
            if accept(m) and isinstance(getattr(m, "weight", None), Tensor)
            and (f"{name}.weight" if name else "weight") not in aliases}


def weight_users(model: nn.Module, name: str) -> list[str]:
    """The layer `name` and the quantizable modules that share its weight (tied: for GPT-2's
    `transformer.wte`, also `lm_head`), by name."""
    others = parameter_owners(model)[id(model.get_submodule(name).weight)]
    return [name] + [n for n in others if n != name and is_quantizable(model.get_submodule(n))]


class UncompressedWarning(UserWarning):
    """Names the weights a compression function left as they were (norms, embeddings GPTQ does not
    quantize, ...), once per call, when the function chose the layers itself. Silence it with
    `warnings.filterwarnings("ignore", category=hk.quant.UncompressedWarning)`."""


@dataclass(frozen=True)
class CompressionReport:
    """What a compression function did, carried by the copy it returns as `.compression`.

    method: the function that made the copy ("quantize_model", "quantization_aware", "freeze",
        "gptq", "round_to_nearest", "magnitude", "obd", "obs", "obs_with_inverse", "obs_dense",
        "gradual").
    layers: {module name: module type} of the layers whose weight it compressed, in model order (a
        tied weight under the name of its first module, see `owned_layers`).
    skipped: {name: module type} of the weights it left as they were: a module's name for its
        `weight`, a parameter's full name otherwise. Biases are never compressed and not listed.
    details: method-specific facts, e.g. the bit width of each layer, or where OBD's diagonal came from.
    """

    method: str
    layers: dict[str, str]
    skipped: dict[str, str]
    details: dict[str, Any] = field(default_factory=dict)


def _uncompressed(model: nn.Module, compressed: Mapping[str, nn.Module]) -> dict[str, str]:
    """{name: owning module type} of the parameters, biases aside, that are not a compressed layer's weight."""
    done = {id(m.weight) for m in compressed.values()}
    skipped = {}
    for name, p in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        if attr == "bias" or id(p) in done:
            continue
        kind = type(model.get_submodule(owner)).__name__
        skipped[owner if attr == "weight" and owner else name] = kind if attr == "weight" else f"{kind} parameter"
    return skipped


def report_compression(model: nn.Module, method: str, compressed: Mapping[str, nn.Module], *, warn: bool,
                       why: str = "", details: Mapping[str, Any] | None = None) -> nn.Module:
    """Attach a `CompressionReport` to `model` (a compressed copy) as `model.compression`, and with
    `warn` name its uncompressed weights in one `UncompressedWarning` (`why` says what the method
    covers and how to choose layers). Returns `model`."""
    skipped = _uncompressed(model, compressed)
    model.compression = CompressionReport(method, {n: type(m).__name__ for n, m in compressed.items()}, skipped,
                                          dict(details or {}))
    if warn and skipped:
        aliases: dict[str, list[str]] = {}
        for alias, canonical in tied_names(model).items():
            aliases.setdefault(canonical.rpartition(".")[0], []).append(alias.rpartition(".")[0])
        by_type: dict[str, list[str]] = {}
        for name, kind in skipped.items():
            also = f" (also {', '.join(aliases[name])})" if name in aliases else ""
            by_type.setdefault(kind, []).append(name + also)
        listing = "; ".join(f"{len(v)} {k}: {', '.join(v)}" for k, v in by_type.items())
        warnings.warn(f"{method}: left {len(skipped)} weights as they were ({listing}). {why}",
                      UncompressedWarning, stacklevel=3)
    return model


# ----------------------------------------------------------------------------- checks
def check_bits(bits: Any, symmetric: bool = False, name: str = "bits") -> int:
    """An integer bit width: 2..16 for symmetric grids (1 bit has no symmetric grid), 1..16 asymmetric."""
    lowest = 2 if symmetric else 1
    if not is_int(bits) or not lowest <= bits <= 16:
        kind = "symmetric" if symmetric else "asymmetric"
        raise ValueError(f"{name}: expected an integer from {lowest} to 16 for a {kind} grid, got {bits!r}")
    return int(bits)


def check_choices(choices: Any, symmetric: bool = False, name: str = "choices") -> tuple[int, ...]:
    """The candidate widths as a sorted tuple of distinct valid bit widths."""
    if isinstance(choices, np.ndarray):
        choices = choices.tolist()
    if isinstance(choices, (int, str)) or not isinstance(choices, Sequence):
        raise TypeError(f"{name}: expected a sequence of bit widths such as (2, 3, 4, 8), got {choices!r}")
    if len(choices) == 0:
        raise ValueError(f"{name}: expected at least one bit width, got an empty sequence")
    widths = tuple(check_bits(b, symmetric, name) for b in choices)
    if len(set(widths)) != len(widths):
        raise ValueError(f"{name}: a width is listed twice in {tuple(choices)}")
    return tuple(sorted(widths))


def default_granularity(granularity: str | None, group_size: Any, ndim: int = 2) -> str:
    """The granularity that `granularity=None` stands for (see the module docstring): "columns" when a
    `group_size` is given, else "channel"; "tensor" for a tensor of fewer than 2 dimensions. A
    granularity that is not None is returned as it is."""
    if granularity is not None:
        return granularity
    if group_size is not None:
        return "columns"
    return "channel" if ndim >= 2 else "tensor"


def check_granularity(granularity: Any, group_size: Any, shape: tuple[int, ...]) -> tuple[str, int | None]:
    """(granularity, group_size) for a tensor of `shape`, None resolved by `default_granularity`;
    a clear ValueError for an unknown granularity or a group size that it does not use."""
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES} or None, got {granularity!r}")
    resolved = default_granularity(granularity, group_size, len(shape))
    if resolved in ("tensor", "channel"):
        if group_size is not None:
            raise ValueError(f"group_size: only used with granularity 'rows' (groups of output rows) or 'columns' "
                             f"(groups of input columns, what the default granularity=None uses when group_size is "
                             f"given), got {group_size!r} with {granularity!r}; drop granularity= for column groups")
        return resolved, None
    if len(shape) < 2:
        raise ValueError(f"granularity: {resolved!r} needs a tensor with at least 2 dimensions, got shape {shape}")
    if not is_int(group_size) or group_size <= 0:
        raise ValueError(f"group_size: expected a positive integer (rows or columns per group), got {group_size!r}")
    return resolved, int(group_size)


def _as_groups(w: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """w reshaped to (number of groups, group length): each row shares one scale.

    When `group_size` does not divide the rows (or columns), the last group is smaller: w is padded
    with zeros to a whole number of groups. Every grid here contains 0 (symmetric grids are centred
    on it, asymmetric ranges are widened to include it), so the padding changes no scale."""
    if granularity == "tensor" or w.dim() == 0:
        return w.reshape(1, -1)
    rows = w.reshape(w.shape[0], -1)
    if granularity == "channel":
        return rows
    if granularity == "rows":
        rows = F.pad(rows, (0, 0, 0, -rows.shape[0] % group_size))
        return rows.reshape(-1, group_size * rows.shape[1])
    rows = F.pad(rows, (0, -rows.shape[1] % group_size))
    return rows.reshape(-1, group_size)  # "columns": consecutive input columns inside each row


def _from_groups(groups: Tensor, w: Tensor, granularity: str) -> Tensor:
    """The inverse of `_as_groups`: drop the zero padding and restore w's shape."""
    if granularity == "rows":
        return groups.reshape(-1, w[0].numel())[: w.shape[0]].reshape(w.shape)
    if granularity == "columns":
        return groups.reshape(w.shape[0], -1)[:, : w[0].numel()].reshape(w.shape)
    return groups.reshape(w.shape)


# ----------------------------------------------------------------------------- the grid
def grid(w: Tensor, bits: int, symmetric: bool = False) -> tuple[Tensor, Tensor, int, int]:
    """The uniform grid of each row of a 2-D tensor: (scale, zero, qmin, qmax), scale and zero (rows, 1).

    The building block of every quantizer here, GPTQ included (it quantizes column by column with
    grids fixed beforehand)."""
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D tensor (one grid per row), got shape {tuple(w.shape)}")
    bits = check_bits(bits, symmetric)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax - 1
        scale = w.abs().amax(dim=1, keepdim=True) / qmax
        zero = torch.zeros_like(scale)
    else:
        qmin, qmax = 0, 2**bits - 1
        low = w.amin(dim=1, keepdim=True).clamp(max=0)
        high = w.amax(dim=1, keepdim=True).clamp(min=0)
        scale = (high - low) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero, qmin, qmax


def round_to_grid(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """The nearest grid point s (clamp(round(x / s) + z, qmin, qmax) - z), broadcasting scale and zero."""
    return scale * (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero)


def fake_quantize(w: Tensor, bits: int, symmetric: bool = False, granularity: str | None = None,
                  group_size: int | None = None) -> Tensor:
    """w rounded to a uniform `bits`-bit grid, one range per group (see the module docstring).

    symmetric: False (default), an asymmetric min-max grid; True, HAWQ's symmetric grid.
    granularity: None (default) is one range per output channel, or per `group_size` input columns
    of each row when `group_size` is given (one range for a tensor of fewer than 2 dimensions);
    "tensor", "channel", "rows" or "columns" as the module docstring says. Both defaults were
    chosen by measurement (the module docstring gives it).

    Returns a new tensor of w's shape and dtype; w is not modified. No gradient flows through the
    rounding (use `ste_fake_quantize` for training)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w: expected a floating-point tensor, got dtype {w.dtype}")
    bits = check_bits(bits, symmetric)
    granularity, group_size = check_granularity(granularity, group_size, tuple(w.shape))
    if w.numel() == 0:
        return w.detach().clone()
    if not torch.isfinite(w).all():
        from ..curvature.operators import NonFiniteError

        raise NonFiniteError(f"w: expected finite weights, got {int((~torch.isfinite(w)).sum())} nan/inf entries")
    with torch.no_grad():
        groups = _as_groups(w.detach(), granularity, group_size)
        scale, zero, qmin, qmax = grid(groups, bits, symmetric)
        return _from_groups(round_to_grid(groups, scale, zero, qmin, qmax), w, granularity)


def ste_fake_quantize(w: Tensor, bits: int, symmetric: bool = False, granularity: str | None = None,
                      group_size: int | None = None) -> Tensor:
    """Fake quantization with the straight-through estimator (Bengio et al., 2013; HAWQ's `ste_round`):
    the forward value is `fake_quantize(w)`, the gradient with respect to w is the identity.

    With ranges taken from w itself nothing is clamped, so the identity is the clamp-masked gradient
    of torch's fake-quantize ops too."""
    return w + (fake_quantize(w, bits, symmetric, granularity, group_size) - w).detach()


def quantization_error(w: Tensor, bits: int, symmetric: bool = False, granularity: str | None = None,
                       group_size: int | None = None) -> float:
    """||Q_b(w) - w||^2, the perturbation HAWQ-V2's sensitivity multiplies by Tr(H) / n (the quantizer
    and its defaults are `fake_quantize`'s)."""
    return float((fake_quantize(w, bits, symmetric, granularity, group_size) - w.detach()).pow(2).sum())


# ----------------------------------------------------------------------------- models
def is_quantizable(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d or nn.Embedding."""
    return is_linear(module) or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights hesskit quantizes, by module name, in model order: Linear, Conv1D,
    Conv1d/2d/3d and Embedding (biases, norms and free parameters stay in floating point). A tied
    weight is listed once, under its first module's name (`owned_layers`): GPT-2's
    `transformer.wte`, whose quantization is also `lm_head`'s."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = owned_layers(model, is_quantizable)
    if not layers:
        raise ValueError(f"model: has no Linear, Conv or Embedding layer to quantize ({type(model).__name__})")
    return layers


def unknown_layer_error(argument: str, unknown: list[str], model: nn.Module, available: Mapping[str, Any],
                        kind: str) -> ValueError:
    """The error for layer names that are not among `available`, pointing a tied alias to its owner."""
    aliases = {a.rpartition(".")[0]: c.rpartition(".")[0] for a, c in tied_names(model).items()}
    hints = [f"{n!r} shares its weight with {aliases[n]!r}, which holds it" for n in unknown if n in aliases]
    hint = f" ({'; '.join(hints)})" if hints else ""
    return ValueError(f"{argument}: unknown layer names {unknown}, not {kind} layers of the model{hint}; the {kind} "
                      f"layers are {list(available)}")


def check_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    """`layers` (None: all, a name, or names) as {name: module} among `quantizable_layers`, in model order."""
    everything = quantizable_layers(model)
    if layers is None:
        return everything
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    unknown = [name for name in layers if name not in everything]
    if unknown:
        raise unknown_layer_error("layers", unknown, model, everything, "quantizable")
    if not layers:
        raise ValueError(f"layers: expected names among the quantizable layers {list(everything)}, got none")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: a layer is listed twice in {layers}")
    return {name: everything[name] for name in everything if name in layers}


def layer_bits(model: nn.Module, bits: int | Mapping[str, int], symmetric: bool = False) -> dict[str, int]:
    """`bits` as {layer name: bit width}: an int applies to every quantizable layer, a mapping names
    some of them (the others stay float). Unknown names and invalid widths raise ValueError."""
    layers = quantizable_layers(model)
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(layers))
        if unknown:
            raise unknown_layer_error("bits", unknown, model, layers, "quantizable")
        return {name: check_bits(bits[name], symmetric, f"bits[{name!r}]") for name in layers if name in bits}
    bits = check_bits(bits, symmetric)
    return {name: bits for name in layers}


class LayerSwapper:
    """A working copy of a model whose layer weights are switched between their floating-point
    values and their fake-quantized ones, in place: the one way hesskit writes quantized weights
    into a copy (`quantize_model` is one configuration of it; `sensitivities(metric="measured")`,
    `pair_interactions`, `exhaustive` and `bisection_search` evaluate many). One copy
    (`model_copy`), then only `copy_` per configuration; the user's model is never modified.

    Args:
        model: the model to copy. Its floating-point layer weights are read, not stored again, so
            it must not change while the swapper is in use.
        layers: names among `quantizable_layers(model)` whose weights may be quantized (a tied
            weight under its first module's name: writing it writes every module that uses it).
        choices: widths whose Q_b(W_i) are computed once, up front, for every layer (for many
            configurations); another width is computed each time it is applied.
        granularity, group_size, symmetric: the quantizer (see `fake_quantize`).
        mode: "eval" puts the copy in eval mode; None keeps every module's mode.
        frozen: the copy's parameters get requires_grad=False (a copy to evaluate, the default);
            False keeps the model's flags (an ordinary model, as `quantize_model` returns).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], choices: Sequence[int] = (),
                 granularity: str | None = None, group_size: int | None = None, symmetric: bool = False,
                 mode: str | None = None, *, frozen: bool = True):
        self.model = model_copy(model)
        if frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
        if mode == "eval":
            self.model.eval()
        self.quantizer = dict(symmetric=symmetric, granularity=granularity, group_size=group_size)
        originals, copies = quantizable_layers(model), quantizable_layers(self.model)
        self.original = {name: layer_weight(originals[name]).detach() for name in layers}  # Conv1D: (out, in)
        self.weights = {name: layer_weight(copies[name]) for name in layers}
        self.precomputed: dict[tuple[str, int], Tensor] = {}
        self.precomputed = {(name, b): self.quantized(name, b) for name in layers for b in choices}
        self.current: dict[str, int | None] = {name: None for name in layers}

    def quantized(self, name: str, bits: int) -> Tensor:
        """Q_b(W) of layer `name` at `bits`, in `layer_weight`'s layout."""
        known = self.precomputed.get((name, bits))
        return fake_quantize(self.original[name], bits, **self.quantizer) if known is None else known

    def apply(self, config: Mapping[str, int | None]) -> nn.Module:
        """Set every layer to its width in `config` (absent or None: floating point); returns the copy."""
        with torch.no_grad():
            for name, w in self.weights.items():
                b = config.get(name)
                if b != self.current[name]:
                    w.copy_(self.original[name] if b is None else self.quantized(name, b))
                    self.current[name] = b
        return self.model


def quantize_model(model: nn.Module, bits: int | Mapping[str, int], granularity: str | None = None,
                   group_size: int | None = None, symmetric: bool = False) -> nn.Module:
    """A copy of `model` whose layer weights are rounded to their grids (round-to-nearest, RTN).

    `bits` is one width for every quantizable layer or {layer name: width}; layers left out, biases
    and norms stay in floating point. The copy is an ordinary model (the weights hold the grid values);
    its `.compression` (`CompressionReport`) lists the layers quantized and the weights left alone,
    and with an int `bits` the latter are also named in an `UncompressedWarning`.

    The grid (`fake_quantize`'s, defaults chosen by measurement, see the module docstring):
        granularity: None (default) is one range per output channel, the practitioners' choice (one
            per tensor lost 10-39 more points at 2 bits in the measurement); with `group_size`, one
            range per `group_size` consecutive input columns of each row ("columns", GPTQ's and
            AWQ's group size), so `quantize_model(model, 2, group_size=8)` is GPTQ's g8 grid.
            "tensor", "channel", "rows" (Q-BERT's groups of output rows) or "columns" choose
            explicitly.
        group_size: rows or columns per range (None: no groups).
        symmetric: False (default), asymmetric min-max grids with 0 in the range (GPTQ's and AWQ's);
            True, HAWQ's and Q-BERT's symmetric grid, which at 2 bits has only three levels.
    Pass the same three to `model_size` to count its storage.
    """
    widths = layer_bits(model, bits, symmetric)
    clone = LayerSwapper(model, list(widths), granularity=granularity, group_size=group_size, symmetric=symmetric,
                         frozen=False).apply(widths)
    layers = quantizable_layers(clone)
    return report_compression(
        clone, "quantize_model", {n: layers[n] for n in widths}, warn=not isinstance(bits, Mapping),
        why="quantize_model quantizes the weights of Linear, Conv1D, Conv and Embedding layers; pass "
            "bits={layer: width} to choose them yourself",
        details=dict(bits=widths, granularity=default_granularity(granularity, group_size), group_size=group_size,
                     symmetric=symmetric))


@dataclass
class ModelSize:
    """Storage of a (fake-)quantized model, in bits.

    weight_bits: sum over quantized layers of n_i * b_i; overhead_bits: one scale (and, for
    asymmetric grids, one b_i-bit zero point) per group; float_bits: every other parameter at its
    dtype's width (biases, norms, unquantized layers); average_bits: weight_bits / quantized weights,
    the "average bits" of HAWQ's budgets; bits_per_weight: the same with the overhead counted;
    total_bits: everything."""

    weight_bits: int
    overhead_bits: int
    float_bits: int
    quantized_weights: int

    @property
    def total_bits(self) -> int:
        return self.weight_bits + self.overhead_bits + self.float_bits

    @property
    def average_bits(self) -> float:
        return self.weight_bits / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def bits_per_weight(self) -> float:
        """(weight_bits + overhead_bits) / quantized weights: the average with the scales counted."""
        return (self.weight_bits + self.overhead_bits) / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def megabytes(self) -> float:
        return self.total_bits / 8 / 2**20


def _num_groups(shape: tuple[int, ...], granularity: str, group_size: int | None) -> int:
    """How many scales `fake_quantize` stores for a tensor of this shape (ragged last groups count)."""
    if granularity == "tensor" or len(shape) == 0:
        return 1
    if granularity == "channel":
        return shape[0]
    if granularity == "rows":
        return -(-shape[0] // group_size)
    return shape[0] * -(-int(torch.Size(shape[1:]).numel()) // group_size)


def model_size(model: nn.Module, bits: int | Mapping[str, int], granularity: str | None = None,
               group_size: int | None = None, symmetric: bool = False, scale_bits: int = 16) -> ModelSize:
    """Exact storage of `quantize_model(model, bits, granularity, group_size, symmetric)` (the same
    defaults: one range per output channel, asymmetric), scale overhead included (see `ModelSize`).

    `scale_bits` is the width of a stored scale (16: fp16 scales, as GPTQ's packed format). Every
    tensor counts once: a tied weight (GPT-2's `lm_head` and `transformer.wte`) is one layer's."""
    widths = layer_bits(model, bits, symmetric)
    if not is_int(scale_bits) or scale_bits <= 0:
        raise ValueError(f"scale_bits: expected a positive integer, got {scale_bits!r}")
    layers = quantizable_layers(model)
    quantized = {id(layers[name].weight): name for name in widths}
    weight = overhead = floating = count = 0
    for p in model.parameters():  # each tensor once
        if id(p) in quantized:
            name = quantized[id(p)]
            b, shape = widths[name], tuple(layer_weight(layers[name]).shape)
            kind, size = check_granularity(granularity, group_size, shape)
            groups = _num_groups(shape, kind, size)
            weight += p.numel() * b
            overhead += groups * (scale_bits + (0 if symmetric else b))
            count += p.numel()
        else:
            floating += p.numel() * torch.finfo(p.dtype).bits
    return ModelSize(weight, overhead, floating, count)


# ----------------------------------------------------------------------------- quantization-aware training
class ActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input on a fixed asymmetric per-tensor grid (static activation
    quantization, as HAWQ-V3 and torch's observers): the range [min, max] is an exponential moving
    average (momentum 0.99, HAWQ's `--act-range-momentum`) of the batch ranges seen while
    `observing` (in train and eval mode alike, like torch's observers), and fixed afterwards. The
    gradient is straight-through where rounding lands inside the grid and 0 where it is clamped
    (torch.fake_quantize_per_tensor_affine's rule)."""

    def __init__(self, bits: int, momentum: float = 0.99):
        super().__init__()
        self.bits = check_bits(bits, symmetric=False, name="act_bits")
        self.momentum = momentum
        self.observing = True
        self.register_buffer("low", torch.tensor(float("nan")))
        self.register_buffer("high", torch.tensor(float("nan")))

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            low, high = x.detach().amin().clamp(max=0), x.detach().amax().clamp(min=0)
            if torch.isnan(self.low):
                self.low.copy_(low), self.high.copy_(high)
            else:
                self.low.lerp_(low, 1 - self.momentum), self.high.lerp_(high, 1 - self.momentum)
        if torch.isnan(self.low):
            raise RuntimeError("ActivationQuantizer: no range yet; run calibration batches with observing=True")
        qmax = 2**self.bits - 1
        scale = ((self.high - self.low) / qmax).clamp(min=torch.finfo(x.dtype).tiny)
        zero = torch.round(-self.low / scale)
        level = torch.round(x.detach() / scale) + zero  # before clamping: the gradient passes where no clamp acts
        q = scale * (level.clamp(0, qmax) - zero)
        inside = (level >= 0) & (level <= qmax)
        return q + (x - x.detach()) * inside


class QuantizedLayer(nn.Module):
    """A Linear/Conv1D/Conv/Embedding whose forward pass uses its fake-quantized weight (straight-through
    gradient to the float weight, which the optimizer keeps updating) and, with `act_bits`, a
    fake-quantized input. The wrapped layer's parameters stay where they were (`.layer`). The weight
    is quantized as `layer_weight` gives it (a Conv1D's per-channel ranges are per output feature)."""

    def __init__(self, layer: nn.Module, bits: int, symmetric: bool = False, granularity: str | None = None,
                 group_size: int | None = None, act_bits: int | None = None):
        super().__init__()
        if not is_quantizable(layer):
            raise TypeError(f"layer: expected nn.Linear, Conv1D, nn.Conv1d/2d/3d or nn.Embedding, got "
                            f"{type(layer).__name__}")
        granularity, group_size = check_granularity(granularity, group_size, tuple(layer_weight(layer).shape))
        self.layer, self.bits, self.symmetric = layer, check_bits(bits, symmetric), symmetric
        self.granularity, self.group_size = granularity, group_size
        self.act = None if act_bits is None or isinstance(layer, nn.Embedding) else ActivationQuantizer(act_bits)

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight in `layer_weight`'s layout ((out, in) for Linear and Conv1D)."""
        return ste_fake_quantize(layer_weight(self.layer), self.bits, self.symmetric, self.granularity,
                                 self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = self.act(x)
        w, layer = self.quantized_weight(), self.layer
        if is_linear(layer):
            return F.linear(x, w, layer.bias)
        if isinstance(layer, nn.Embedding):
            return F.embedding(x, w, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                               layer.sparse)
        return layer._conv_forward(x, w, layer.bias)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantization_aware(model: nn.Module, bits: int | Mapping[str, int], act_bits: int | None = None,
                       granularity: str | None = None, group_size: int | None = None,
                       symmetric: bool = False) -> nn.Module:
    """A copy of `model` ready for quantization-aware fine-tuning: each layer named by `bits` is
    wrapped in a `QuantizedLayer` (fake-quantized weight with a straight-through gradient; with
    `act_bits`, a fake-quantized input whose range is observed while `observing` is True: run a
    few batches, then `observe_activations(qat_model, False)` to fix them, or keep observing).
    A tied weight is one layer's (`quantizable_layers`), but every module using it is wrapped with
    the same grid (GPT-2's `lm_head` as well as `transformer.wte`), so the forward pass is the
    quantized model's. `freeze(qat_model)` returns the plain quantized model afterwards. The copy
    carries `.compression` as `quantize_model`'s does. The weight grid and its defaults (one range
    per output channel, asymmetric) are `quantize_model`'s; activations get an asymmetric
    per-tensor grid (`ActivationQuantizer`)."""
    if act_bits is not None:
        check_bits(act_bits, symmetric=False, name="act_bits")
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if is_quantizable(model):
        raise ValueError("model: expected a model containing layers, got a bare layer; wrap it in nn.Sequential")
    widths = layer_bits(model, bits, symmetric)
    clone = model_copy(model)
    layers = quantizable_layers(clone)
    for name, b in widths.items():
        for user in weight_users(clone, name):
            _replace(clone, user, QuantizedLayer(clone.get_submodule(user), b, symmetric, granularity, group_size,
                                                 act_bits))
    return report_compression(
        clone, "quantization_aware", {n: layers[n] for n in widths}, warn=not isinstance(bits, Mapping),
        why="quantization_aware wraps Linear, Conv1D, Conv and Embedding layers; pass bits={layer: width} to "
            "choose them yourself",
        details=dict(bits=widths, act_bits=act_bits, granularity=default_granularity(granularity, group_size),
                     group_size=group_size, symmetric=symmetric))


def observe_activations(model: nn.Module, observing: bool) -> nn.Module:
    """Switch range observation of every `ActivationQuantizer` in a quantization-aware model on or
    off (like `model.train()`, it changes that model in place and returns it)."""
    for m in model.modules():
        if isinstance(m, ActivationQuantizer):
            m.observing = bool(observing)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """After quantization-aware training: a copy in which every `QuantizedLayer` is replaced by its
    plain layer holding the quantized weight. Activation quantizers stay, with their ranges fixed,
    in front of their layer (`nn.Sequential(act, layer)`)."""
    clone = model_copy(model)
    observe_activations(clone, False)
    wrapped = [(n, m) for n, m in clone.named_modules() if isinstance(m, QuantizedLayer)]
    frozen: dict[str, nn.Module] = {}
    for name, m in wrapped:
        if all(m.layer.weight is not other.weight for other in frozen.values()):  # a tied weight once
            with torch.no_grad():
                w = layer_weight(m.layer)
                w.copy_(fake_quantize(w, m.bits, m.symmetric, m.granularity, m.group_size))
            frozen[name] = m.layer
        _replace(clone, name, m.layer if m.act is None else nn.Sequential(m.act, m.layer))
    return report_compression(clone, "freeze", frozen, warn=False)
