"""Layers of real models, seen the way second-order methods see them.

Hugging Face's GPT-2 family stores its projections in `transformers.pytorch_utils.Conv1D`: a
linear layer y = x W + b whose weight is stored transposed, (in_features, out_features). Every
part of hesskit that treats a layer as a matrix (K-FAC and MKOR factors, GPTQ, per-channel
quantization, pruning) goes through `linear_weight`, so a Conv1D is the nn.Linear it is. It is
recognised by its shape and attributes, so hesskit does not import `transformers`.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["is_conv1d", "is_linear", "linear_weight", "parameter_owners", "tied_names"]


def is_conv1d(module: nn.Module) -> bool:
    """A `transformers.pytorch_utils.Conv1D` (or a layer built the same way): `nf` output features
    and a 2-D weight of shape (in_features, nf)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The (out_features, in_features) weight of a linear layer: nn.Linear's own weight, or the
    transposed view of a Conv1D's (writing into the view writes the layer's weight)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    raise TypeError(f"module: expected nn.Linear or transformers' Conv1D, got {type(module).__name__}")


def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: canonical name} for parameters registered under more than one name (tied weights,
    e.g. GPT-2's `lm_head.weight` is `transformer.wte.weight`). The canonical name is the one
    `model.named_parameters()` reports."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    return {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != name}


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """The names of the modules holding each parameter directly, in model order, by parameter id
    (two or more: a tied weight, e.g. GPT-2's `transformer.wte` and `lm_head`)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners
