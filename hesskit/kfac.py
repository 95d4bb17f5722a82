r"""Kronecker-factored curvature (K-FAC): per-layer factors A and G captured by module hooks.

For one sample, a layer y = W a_bar (nn.Linear: a_bar = [x, 1]; nn.Conv2d: a_bar = an unfolded
input patch with a 1 appended for the bias) with output gradient g = dl/dy has the weight
gradient g a_bar^T, and its curvature block E[vec(g a_bar^T) vec(g a_bar^T)^T] (empirical or
true Fisher) is approximated by a Kronecker product (Martens & Grosse 2015, "Optimizing Neural
Networks with Kronecker-factored Approximate Curvature"), assuming activations and output
gradients independent:

    F  ~  A (x) G,     A = E[a_bar a_bar^T],     G = E[g g^T].

With the weight flattened row by row (hesskit's parameter order) and the bias appended as a
last column, vec(g a_bar^T) = kron(g, a_bar), so the block is kron(G, A) in that layout;
`KroneckerFactor.dense()` then moves the bias entries after the weight entries, the order of
[weight, bias] in `hk.EmpiricalFisherOperator(...).restrict([...weight, ...bias])`.

Conventions (public codes differ; these are the ones used here):

* Per-sample gradients. The loss is a batch mean, so the output gradient captured for sample
  n is (1/N) dl_n/dy_n; it is multiplied by N. A single sample's A (x) G is then exactly that
  sample's Fisher block.
* Positions (Conv2d; KFC, Grosse & Martens 2016, "A Kronecker-factored approximate Fisher
  matrix for convolution layers"). With T output positions t, patches a_bar_nt and output
  gradients g_nt,

      A = (1/N) sum_n (1/T) sum_t a_bar_nt a_bar_nt^T        (mean over positions)
      G = (1/N) sum_n       sum_t g_nt g_nt^T                (sum over positions)

  so A (x) G = T E[a_bar a_bar^T] (x) E[g g^T], KFC's approximation of the conv Fisher block
  under spatial homogeneity and spatially uncorrelated derivatives. The product (the only thing
  the eigen-damped preconditioner sees) equals alecwangcq/KFAC-Pytorch's, which splits the T
  differently (A / T, G * T); gpauloski/kfac-pytorch divides patches and output gradients by T,
  a different scale for the damping. Extra dimensions of a Linear input (sequence positions)
  are treated as positions the same way ("K-FAC-expand", Eschenhagen et al. 2023). A layer
  called several times in one forward pass contributes each call as more positions.
* Bias: the bias column of ones is part of a_bar whenever the layer has a bias that is
  trained, so A has size fan_in + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._batches import Batches, move_batch
from . import trace
from ._probe import check_choice, make_generator

__all__ = ["KroneckerFactor", "kfac_factors"]

FISHERS = ("empirical", "mc")


# --------------------------------------------------------------------- which layers
def supported(module: nn.Module) -> str | None:
    """None if K-FAC can precondition `module` (Linear, Conv2d with groups=1), else the reason."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        return None if module.groups == 1 else f"groups={module.groups}"
    return "not Linear or Conv2d"


@dataclass
class Layer:
    """A preconditioned layer: its name, module and the trained parameters [weight, (bias)]."""

    name: str
    module: nn.Module
    has_bias: bool

    @property
    def params(self) -> list[Tensor]:
        return [self.module.weight, self.module.bias] if self.has_bias else [self.module.weight]

    @property
    def shape(self) -> tuple[int, int]:
        """(fan_out, fan_in + has_bias): the shape of the gradient matrix [dW | db]."""
        w = self.module.weight
        return w.shape[0], w[0].numel() + int(self.has_bias)

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        """[dW | db] with dW flattened per output row: (fan_out, fan_in + has_bias)."""
        mat = grads[0].reshape(grads[0].shape[0], -1)
        return torch.cat([mat, grads[1].reshape(-1, 1)], dim=1) if self.has_bias else mat

    def split(self, mat: Tensor) -> list[Tensor]:
        """Undo `grad_matrix`: [dW, (db)] shaped like the parameters."""
        w = self.module.weight
        if self.has_bias:
            return [mat[:, :-1].reshape(w.shape), mat[:, -1].reshape(self.module.bias.shape)]
        return [mat.reshape(w.shape)]


def find_layers(model: nn.Module, trained: Iterable[Tensor]) -> tuple[list[Layer], dict[str, str]]:
    """Split the trained parameters into preconditioned layers and the rest.

    Returns (layers, fallback) where fallback maps each other module owning trained parameters
    to a description ("LayerNorm", "Conv2d (groups=4)", ...), for the warning.
    """
    trained_ids = {id(p) for p in trained}
    inside_attention = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    owners: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            owners[id(m.weight)] = owners.get(id(m.weight), 0) + 1
    layers, claimed = [], set()
    reasons: dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if id(m.weight) not in trained_ids:
            reasons[name] = f"{type(m).__name__} (weight not trained)"
            continue
        why = supported(m)
        if id(m) in inside_attention:
            why = "inside MultiheadAttention, which bypasses its forward"
        elif owners[id(m.weight)] > 1:
            why = "weight shared with another layer"
        if why is None:
            has_bias = m.bias is not None and id(m.bias) in trained_ids
            layers.append(Layer(name or type(model).__name__, m, has_bias))
            claimed.update(id(p) for p in layers[-1].params)
        else:
            reasons[name] = f"{type(m).__name__} ({why})"
    fallback: dict[str, str] = {}
    for pname, p in model.named_parameters():
        if id(p) in trained_ids and id(p) not in claimed:
            owner = pname.rpartition(".")[0]
            if not owner:  # a parameter of the model itself
                fallback[pname] = f"parameter of {type(model).__name__}"
            else:
                fallback.setdefault(owner, reasons.get(owner, type(model.get_submodule(owner)).__name__))
    return layers, fallback


# --------------------------------------------------------------------- capture
def expanded_inputs(module: nn.Module, x: Tensor, has_bias: bool) -> Tensor:
    """a_bar as (N, T, fan_in + has_bias): Linear inputs with positions, or Conv2d patches (KFC)."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)  # every padding mode and "same"
        a = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride).transpose(1, 2)
    else:
        a = x.reshape(1, 1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1, x.shape[-1])
    if has_bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def expanded_output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as (N, T, fan_out)."""
    if isinstance(module, nn.Conv2d):
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)
    return g.reshape(1, 1, -1) if g.dim() == 1 else g.reshape(g.shape[0], -1, g.shape[-1])


class LayerCapture:
    """Records the inputs and output gradients of `layers` while inside `with capture:`.

    Forward hooks are registered on entering and removed on exit, so the model is untouched
    outside; the output gradients come from tensor hooks on the layer outputs and are recorded
    only while `record_grads` is True (e.g. during the sampled-label backward of the true
    Fisher, not the training backward). Each layer call is one (input, output gradient) pair;
    a call whose output does not reach the loss gets a zero gradient.
    """

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.record_grads = True
        self.inputs: dict[int, list[Tensor]] = {}
        self.grads: dict[int, dict[int, Tensor]] = {}
        self._handles: list[Any] = []
        self._active = False

    def __enter__(self) -> LayerCapture:
        self._active = True
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self._active or not torch.is_grad_enabled() or not output.requires_grad:
                return
            calls = self.inputs.setdefault(i, [])
            call = len(calls)
            calls.append(args[0].detach())

            def grad_hook(grad: Tensor) -> None:
                if self._active and self.record_grads:
                    self.grads.setdefault(i, {})[call] = grad.detach()

            self._handles.append(output.register_hook(grad_hook))

        return hook

    def expanded(self, i: int) -> tuple[Tensor, Tensor] | None:
        """(a_bar, g) of layer i as (N, T, .) with per-sample g (times N), or None if it was not called."""
        layer = self.layers[i]
        calls = self.inputs.get(i, [])
        if not calls:
            return None
        a_list, g_list = [], []
        grads = self.grads.get(i, {})
        for call, x in enumerate(calls):
            a = expanded_inputs(layer.module, x, layer.has_bias)
            g = grads.get(call)
            g = a.new_zeros(a.shape[0], a.shape[1], layer.shape[0]) if g is None else expanded_output_grads(layer.module, g)
            a_list.append(a)
            g_list.append(g)
        if len({a.shape[0] for a in a_list}) > 1:
            raise ValueError(f"model: layer {layer.name!r} was called with different batch sizes in one forward pass")
        a, g = torch.cat(a_list, dim=1), torch.cat(g_list, dim=1)
        return a, g * a.shape[0]

    def factors(self, i: int) -> tuple[Tensor, Tensor, int] | None:
        """(A, G, N) of layer i from this capture (see the module docstring), or None."""
        found = self.expanded(i)
        if found is None:
            return None
        a, g = found
        N, T = a.shape[0], a.shape[1]
        a2, g2 = a.reshape(N * T, -1), g.reshape(N * T, -1)
        A = a2.T @ a2 / (N * T)
        G = g2.T @ g2 / N
        return (A + A.T) / 2, (G + G.T) / 2, N


# --------------------------------------------------------------------- true Fisher labels
def sampled_label_loss(outputs: Tensor, gen: torch.Generator) -> Tensor:
    """`hesskit.trace.sampled_label_loss` for fisher="mc": its gradient is a sample of the true
    Fisher's "g" (Martens & Grosse 2015, section 5), so E[A (x) G] of one sample is its GGN block."""
    if not isinstance(outputs, Tensor) or outputs.dim() < 2 or not outputs.requires_grad:
        raise ValueError("outputs: fisher='mc' needs the logits (shape (..., classes)) with their graph")
    return trace.sampled_label_loss(outputs, gen)


# --------------------------------------------------------------------- public API
@dataclass
class KroneckerFactor:
    """A layer's Kronecker factors: its curvature block is approximated by A (x) G.

    A: (fan_in + has_bias) square, G: (fan_out) square; `dense()` is the approximation as a
    matrix in hesskit's parameter order [weight (row-major), bias].
    """

    A: Tensor
    G: Tensor
    weight_shape: tuple[int, ...]
    has_bias: bool

    @property
    def num_params(self) -> int:
        return self.A.shape[0] * self.G.shape[0]

    def dense(self) -> Tensor:
        """kron(G, A) reordered from the [W | b] row-major layout to [weight, bias]."""
        out, cols = self.G.shape[0], self.A.shape[0]
        K = torch.kron(self.G, self.A)
        if not self.has_bias:
            return K
        layout = torch.arange(out * cols).reshape(out, cols)
        order = torch.cat([layout[:, :-1].reshape(-1), layout[:, -1]]).to(K.device)
        return K[order][:, order]


def kfac_factors(model: nn.Module, criterion: Callable[[Any, Any], Tensor], data: Any, fisher: str = "empirical",
                 seed: int | None = None) -> dict[str, KroneckerFactor]:
    """K-FAC factors of every Linear and Conv2d layer of `model` on `data`.

    Args:
        model: the network; it is left as it was (hooks are removed, no mode change).
        criterion: `criterion(outputs, targets)` returning the batch-mean loss.
        data: one `(inputs, targets)` batch or an iterable of them; batches are weighted by size.
        fisher: "empirical" (output gradients of `criterion` on the targets) or "mc" (the true
            Fisher: labels drawn from the model's softmax, outputs = logits with classes last;
            Martens & Grosse 2015).
        seed: the label sampler's seed for "mc" (None draws one).

    Returns:
        {layer name: KroneckerFactor}, with the conventions of this module's docstring.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(criterion):
        raise TypeError(f"criterion: expected a callable criterion(outputs, targets), got {type(criterion).__name__}")
    check_choice("fisher", fisher, FISHERS)
    _, gen = make_generator(seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    layers, _ = find_layers(model, trained)
    if not layers:
        raise ValueError("model: has no trainable nn.Linear or nn.Conv2d layer")
    first = layers[0].module.weight
    sums: dict[int, list[Tensor]] = {}
    total = 0
    for count, batch in Batches(data):
        x, y = move_batch(batch, first.device, first.dtype)
        with torch.enable_grad(), LayerCapture(layers) as capture:
            outputs = model(x)
            loss = sampled_label_loss(outputs, gen) if fisher == "mc" else criterion(outputs, y)
            torch.autograd.grad(loss, [layer.module.weight for layer in layers], allow_unused=True)
        for i in range(len(layers)):
            found = capture.factors(i)
            if found is not None:
                A, G, _ = found
                if i in sums:
                    sums[i][0] += count * A
                    sums[i][1] += count * G
                else:
                    sums[i] = [count * A, count * G]
        total += count
    return {
        layers[i].name: KroneckerFactor(A / total, G / total, tuple(layers[i].module.weight.shape), layers[i].has_bias)
        for i, (A, G) in sums.items()
    }
