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
`KroneckerOperator.dense()` then moves the bias entries after the weight entries, the order of
[weight, bias] in `hk.EmpiricalFisherOperator(...).restrict([...weight, ...bias])`.

Layers (`supported`):

* nn.Linear, and Hugging Face's `Conv1D` (GPT-2's projections: y = x W + b with W stored as
  (in, out)), seen through `hesskit.layers.linear_weight`: its factors, gradient matrix and
  `weight_shape` are those of the equivalent nn.Linear, and updates are written back transposed.
  A fused projection such as GPT-2's `c_attn` (one Conv1D producing q, k and v) is one matrix
  with one pair of factors: the approximation then also couples q, k and v, as it couples the
  rows of any wide layer.
* nn.Conv2d with groups=1 (KFC, below).
* nn.Embedding: the linear layer of one-hot inputs, W^T e_token, so A = E[e e^T] is diagonal,
  the token frequencies; it is kept as a vector (tensorflow/kfac's and gpauloski/kfac-pytorch's
  embedding factors) and the weight, stored (vocab, dim), is seen as its (dim, vocab) transpose.

Everything else (LayerNorm, BatchNorm, Conv1d, bare parameters, ...) is not Kronecker-factored:
LayerNorm's and biases' elementwise parameters have no input/output-gradient structure to
factor. `find_layers` names each such module and why. Two more reasons a layer is left out:

* Tied weights. A parameter held by more than one module (GPT-2's `lm_head.weight` is
  `transformer.wte.weight`) has a gradient that sums every user's contribution, while a
  layer's factors see only its own inputs and outputs. Its curvature is not that layer's
  A (x) G, so the layer is not preconditioned ("tied with transformer.wte").
* Size. A dense factor with more than `max_factor_size` rows is not built (default
  `DEFAULT_MAX_FACTOR_SIZE`): the output factor of a language-model head is vocabulary-square,
  50,257^2 for GPT-2, 20 GB in float64, and its eigendecomposition would take hours.

Conventions (public codes differ; these are the ones used here):

* Per-sample gradients. The loss is a batch mean, so the output gradient captured for sample
  n is (1/N) dl_n/dy_n; it is multiplied by N. A single sample's A (x) G is then exactly that
  sample's Fisher block. fisher="mc" knows its loss: the mean over the M label-sampled
  predictions (M = N for a classifier, N x T for a language model's (N, T, V) logits), so its
  gradients are multiplied by M and G is divided by M instead (per-prediction gradients, as
  in Eschenhagen et al. 2023's K-FAC-expand): E[A (x) G] is then the GGN block (= true Fisher)
  of the mean loss, with sequence outputs too. The empirical Fisher stays per sample (a
  sequence is one sample, as in `hk.EmpiricalFisherOperator` and `hk.SequenceCrossEntropy`): for
  a loss averaged over T tokens per sequence its G is about 1/T of the per-token one. A layer
  whose input is shared by the whole batch (batch size 1 while the others see N: Hugging
  Face's position embeddings, looked up once and broadcast) only sees the batch's summed output
  gradient; it is scaled as one sample of the largest batch in the pass.
* Positions (Conv2d; KFC, Grosse & Martens 2016, "A Kronecker-factored approximate Fisher
  matrix for convolution layers"). With T output positions t, patches a_bar_nt and output
  gradients g_nt,

      A = (1/N) sum_n (1/T) sum_t a_bar_nt a_bar_nt^T        (mean over positions)
      G = (1/N) sum_n       sum_t g_nt g_nt^T                (sum over positions)

  so A (x) G = T E[a_bar a_bar^T] (x) E[g g^T], KFC's approximation of the conv Fisher block
  under spatial homogeneity and spatially uncorrelated derivatives. The product (the only thing
  the eigen-damped preconditioner sees) equals alecwangcq/KFAC-Pytorch's, which splits the T
  differently (A / T, G * T); gpauloski/kfac-pytorch divides patches and output gradients by T,
  a different scale for the damping. Extra dimensions of a Linear, Conv1D or Embedding input
  (sequence positions) are treated as positions the same way: "K-FAC-expand" (Eschenhagen et
  al. 2023, "Kronecker-Factored Approximate Curvature for Modern Neural Network
  Architectures"), exact for deep linear networks whose loss has a term per position, as a
  language model's. Their "K-FAC-reduce" (A from the position mean of the inputs, G from the
  position sum of the output gradients), exact when the loss sees a pooled output, as a
  classifier's, is not implemented; they found the two train a ViT and a GNN about equally
  well. A layer called several times in one forward pass contributes each call as more
  positions.
* Bias: the bias column of ones is part of a_bar whenever the layer has a bias that is
  trained, so A has size fan_in + 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import trace
from .operators import MatrixFreeOperator
from .._batches import Batches, move_batch
from .._model import call_model, model_output, split_batch
from .._checks import check_choice
from .probes import make_generator
from ..layers import is_conv1d, is_linear, linear_weight, parameter_owners

__all__ = ["DEFAULT_MAX_FACTOR_SIZE", "KroneckerOperator", "kfac_factors"]

FISHERS = ("empirical", "mc")

# The largest factor (rows of A or G) that is built. Every hidden, fused-qkv and MLP width of BERT-base/large
# (768-4096) and GPT-2 small to XL (768-6400) fits with its bias row; the vocabulary-square output factor of a
# language-model head (BERT 30,522, GPT-2 50,257: 20 GB in float64) does not. At the limit a float64 factor takes
# 512 MiB, and its eigendecomposition minutes on a CPU (a 4096-square one took 76 s on 2 cores; cost grows as n^3).
DEFAULT_MAX_FACTOR_SIZE = 8192


# --------------------------------------------------------------------- which layers
def supported(module: nn.Module) -> str | None:
    """None if K-FAC can precondition `module` (Linear, Conv1D, Conv2d with groups=1, Embedding), else the reason."""
    if is_linear(module):
        return None
    if isinstance(module, nn.Conv2d):
        return None if module.groups == 1 else f"groups={module.groups}"
    if isinstance(module, nn.Embedding):
        return "sparse gradients" if module.sparse else None
    return "not Linear, Conv1D, Conv2d or Embedding"


def is_layer(module: nn.Module, embeddings: bool = True) -> bool:
    """A module of a type K-FAC handles (each one may still be excluded, see `exclusion`)."""
    return is_linear(module) or isinstance(module, nn.Conv2d) or (embeddings and isinstance(module, nn.Embedding))


def tied_with(name: str, params: Iterable[Tensor], owners: dict[int, list[str]]) -> list[str]:
    """The other modules that hold any of `params` (those of module `name`)."""
    return sorted({other for p in params for other in owners.get(id(p), []) if other != name})


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
    def diagonal_inputs(self) -> bool:
        """An Embedding: its inputs are one-hot rows, so A is diagonal (the token frequencies), kept as a vector."""
        return isinstance(self.module, nn.Embedding)

    @property
    def transposed(self) -> bool:
        """Conv1D and Embedding store their weight as (in, out), the transpose of the block the factors see."""
        return is_conv1d(self.module) or self.diagonal_inputs

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight as the factors see it: (out, in) for Linear, Conv1D and Embedding, as stored for Conv2d."""
        if is_linear(self.module):
            return tuple(linear_weight(self.module).shape)
        w = self.module.weight
        return tuple(w.T.shape if self.diagonal_inputs else w.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """(fan_out, fan_in + has_bias): the shape of the gradient matrix [dW | db], the sizes of G and A."""
        out, *rest = self.weight_shape
        return out, math.prod(rest) + int(self.has_bias)

    def grad_matrix(self, grads: list[Tensor]) -> Tensor:
        """[dW | db] with dW flattened per output row (transposed if stored (in, out)): (fan_out, fan_in + has_bias)."""
        dW = grads[0].T if self.transposed else grads[0].reshape(grads[0].shape[0], -1)
        return torch.cat([dW, grads[1].reshape(-1, 1)], dim=1) if self.has_bias else dW

    def split(self, mat: Tensor) -> list[Tensor]:
        """Undo `grad_matrix`: [dW, (db)] shaped like the parameters (transposed back if stored (in, out))."""
        w = self.module.weight
        dW = mat[:, :-1] if self.has_bias else mat
        dW = (dW.T if self.transposed else dW).reshape(w.shape)
        return [dW, mat[:, -1].reshape(self.module.bias.shape)] if self.has_bias else [dW]


def exclusion(name: str, layer: Layer, owners: dict[int, list[str]], inside_attention: set[int],
              max_factor_size: int | None) -> str | None:
    """Why `layer` (module `name`) is not preconditioned, or None."""
    why = supported(layer.module)
    if why is not None:
        return why
    if id(layer.module) in inside_attention:
        return "inside MultiheadAttention, which bypasses its forward"
    tied = tied_with(name, layer.params, owners)
    if tied:
        return f"tied with {', '.join(tied)}"
    out, cols = layer.shape
    dense = {"G": out} if layer.diagonal_inputs else {"G": out, "A": cols}
    which, size = max(dense.items(), key=lambda item: item[1])
    if max_factor_size is not None and size > max_factor_size:
        return f"its factor {which} would be {size} x {size}, above max_factor_size={max_factor_size}"
    return None


def candidate_layers(model: nn.Module, trained_ids: set[int], max_factor_size: int | None,
                     embeddings: bool = True) -> tuple[list[Layer], dict[str, str]]:
    """The Linear, Conv1D, Conv2d and Embedding modules of `model`: the preconditioned layers,
    and {name: "Linear, why not"} for the others."""
    owners = parameter_owners(model)
    inside_attention = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    layers, reasons = [], {}
    for name, m in model.named_modules():
        if not is_layer(m, embeddings):
            continue
        if id(m.weight) not in trained_ids:
            reasons[name] = f"{type(m).__name__}, weight not trained"
            continue
        bias = getattr(m, "bias", None)
        layer = Layer(name or type(model).__name__, m, bias is not None and id(bias) in trained_ids)
        why = exclusion(name, layer, owners, inside_attention, max_factor_size)
        if why is None:
            layers.append(layer)
        else:
            reasons[name] = f"{type(m).__name__}, {why}"
    return layers, reasons


def find_layers(model: nn.Module, trained: Iterable[Tensor], max_factor_size: int | None = None,
                embeddings: bool = True) -> tuple[list[Layer], dict[str, str]]:
    """Split the trained parameters into preconditioned layers and the rest.

    Returns (layers, fallback) where fallback maps each other module owning trained parameters
    to a description ("LayerNorm", "Conv2d, groups=4", "Linear, tied with transformer.wte", ...),
    for the warning. `max_factor_size`: None builds factors of any size; `embeddings=False`
    leaves nn.Embedding out (MKOR).
    """
    trained_ids = {id(p) for p in trained}
    layers, reasons = candidate_layers(model, trained_ids, max_factor_size, embeddings)
    claimed = {id(p) for layer in layers for p in layer.params}
    owners = parameter_owners(model)
    fallback: dict[str, str] = {}
    for pname, p in model.named_parameters():
        if id(p) in trained_ids and id(p) not in claimed:
            owner = pname.rpartition(".")[0]
            if not owner:  # a parameter of the model itself
                fallback[pname] = f"parameter of {type(model).__name__}"
            elif owner not in fallback:
                module = model.get_submodule(owner)
                tied = tied_with(owner, module.parameters(recurse=False), owners)
                kind = type(module).__name__ + (f", tied with {', '.join(tied)}" if tied else "")
                fallback[owner] = reasons.get(owner, kind)
    for name, why in reasons.items():  # e.g. a tied head, whose weight is listed under the embedding's name
        if id(model.get_submodule(name).weight) in trained_ids:
            fallback.setdefault(name, why)
    return layers, fallback


# --------------------------------------------------------------------- capture
def expanded_inputs(module: nn.Module, x: Tensor, has_bias: bool) -> Tensor:
    """a_bar as (N, T, fan_in + has_bias): Linear / Conv1D inputs with positions, or Conv2d patches
    (KFC); for an Embedding the token ids as (N, T), the positions of the ones in its one-hot a."""
    if isinstance(module, nn.Embedding):
        return x.reshape(1, 1) if x.dim() == 0 else x.reshape(x.shape[0], -1)
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


def input_batch_size(module: nn.Module, x: Tensor) -> int:
    """N of `expanded_inputs(module, x, ...)`, without building it (an unbatched input counts as 1)."""
    unbatched = 0 if isinstance(module, nn.Embedding) else 3 if isinstance(module, nn.Conv2d) else 1
    return 1 if x.dim() == unbatched else x.shape[0]


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
    a call whose output does not reach the loss gets a zero gradient. `loss_terms`: the number
    of terms the recorded loss averages (None: one per sample of the batch), see the module
    docstring.
    """

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.record_grads = True
        self.loss_terms: int | None = None
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
        """(a_bar, g) of layer i as (N, T, .) with per-term g (times `terms(N)`), or None if it was not called."""
        layer = self.layers[i]
        calls = self.inputs.get(i, [])
        if not calls:
            return None
        a_list, g_list = [], []
        grads = self.grads.get(i, {})
        for call, x in enumerate(calls):
            a = expanded_inputs(layer.module, x, layer.has_bias)
            g = grads.get(call)
            if g is None:
                g = layer.module.weight.new_zeros(a.shape[0], a.shape[1], layer.shape[0])
            else:
                g = expanded_output_grads(layer.module, g)
            a_list.append(a)
            g_list.append(g)
        if len({a.shape[0] for a in a_list}) > 1:
            raise ValueError(f"model: layer {layer.name!r} was called with different batch sizes in one forward pass")
        a, g = torch.cat(a_list, dim=1), torch.cat(g_list, dim=1)
        return a, g * self.terms(a.shape[0])

    def terms(self, batch_size: int) -> int:
        """The number of terms the recorded loss is a mean of: `loss_terms`, else one per sample.

        A layer whose input is shared by the whole batch (batch size 1 while other layers see N,
        e.g. position embeddings looked up once and broadcast) only ever sees the batch's summed
        output gradient; it is scaled as a sample of the largest batch, the larger (safer) of the
        two possible scales for its G."""
        if self.loss_terms is not None:
            return self.loss_terms
        if batch_size > 1:
            return batch_size
        return max(input_batch_size(self.layers[i].module, calls[0]) for i, calls in self.inputs.items())

    def factors(self, i: int) -> tuple[Tensor, Tensor, int] | None:
        """(A, G, N) of layer i from this capture (see the module docstring), or None."""
        found = self.expanded(i)
        if found is None:
            return None
        a, g = found
        N, T = a.shape[0], a.shape[1]
        g2 = g.reshape(N * T, -1)
        G = g2.T @ g2 / self.terms(N)
        if self.layers[i].diagonal_inputs:  # the one-hot rows' mean: the token frequencies
            A = torch.bincount(a.reshape(-1), minlength=self.layers[i].shape[1]).to(g.dtype) / (N * T)
            return A, (G + G.T) / 2, N
        a2 = a.reshape(N * T, -1)
        A = a2.T @ a2 / (N * T)
        return (A + A.T) / 2, (G + G.T) / 2, N


# --------------------------------------------------------------------- true Fisher labels
def sampled_label_backward(capture: LayerCapture, outputs: Any, gen: torch.Generator) -> None:
    """fisher="mc": one backward pass of `hesskit.curvature.trace.sampled_label_loss` (labels drawn from the
    model's softmax by `gen`), recorded by `capture`. Its gradient is a sample of the true
    Fisher's "g" (Martens & Grosse 2015, section 5), so E[A (x) G] of one prediction is its GGN
    block. `outputs`: the logits (classes last: (N, C), or (N, T, V) for a language model) with
    their graph, or a ModelOutput holding them; the loss is the mean over their M predictions."""
    logits = model_output(outputs, None)
    if logits.dim() < 2 or not logits.requires_grad:
        raise ValueError("outputs: fisher='mc' needs the logits (shape (..., classes)) with their graph")
    capture.record_grads = True
    capture.loss_terms = logits.numel() // logits.shape[-1]
    weights = [layer.module.weight for layer in capture.layers]
    torch.autograd.grad(trace.sampled_label_loss(logits, gen), weights, allow_unused=True)


# --------------------------------------------------------------------- public API
class KroneckerOperator(MatrixFreeOperator):
    """A layer's Kronecker-factored curvature block A (x) G, as an operator (products without
    forming the block: (A (x) G) vec(M) = vec(G M A) for the [W | b] matrix M).

    A: (fan_in + has_bias) square, G: (fan_out) square; products and `dense()` use hesskit's
    parameter order [weight (row-major), bias]. For a Conv1D or an Embedding, whose stored weight
    is (in, out), `weight_shape` and the row-major order are those of the (out, in) view. An
    Embedding's A is diagonal and kept as the vector of its diagonal (the token frequencies): a
    vocabulary-square matrix would not fit.
    """

    kind = "kfac"

    def __init__(self, A: Tensor, G: Tensor, weight_shape: tuple[int, ...], has_bias: bool):
        self.A, self.G = A, G
        self.weight_shape, self.has_bias = tuple(weight_shape), bool(has_bias)
        super().__init__(A.shape[0] * G.shape[0], G.dtype, G.device)

    def __repr__(self) -> str:
        return (f"KroneckerOperator(A={tuple(self.A.shape)}, G={tuple(self.G.shape)}, weight_shape={self.weight_shape}, "
                f"has_bias={self.has_bias})")

    @property
    def num_params(self) -> int:
        return self.shape[0]

    def _matmat(self, V: Tensor) -> Tensor:
        out, cols, k = self.G.shape[0], self.A.shape[0], V.shape[1]
        inputs = cols - self.has_bias
        M = V[: out * inputs].T.reshape(k, out, inputs)
        if self.has_bias:
            M = torch.cat([M, V[out * inputs :].T.reshape(k, out, 1)], dim=2)
        GM = self.G @ M
        R = GM * self.A if self.A.dim() == 1 else GM @ self.A
        flat = [R[:, :, :inputs].reshape(k, -1)] + ([R[:, :, inputs]] if self.has_bias else [])
        return torch.cat(flat, dim=1).T

    def dense(self, progress: bool = False) -> Tensor:
        """kron(G, A) reordered from the [W | b] row-major layout to [weight, bias] (formed
        directly, no products; `progress` is accepted for the operator interface)."""
        out, cols = self.G.shape[0], self.A.shape[0]
        K = torch.kron(self.G, torch.diag(self.A) if self.A.dim() == 1 else self.A)
        if not self.has_bias:
            return K
        layout = torch.arange(out * cols).reshape(out, cols)
        order = torch.cat([layout[:, :-1].reshape(-1), layout[:, -1]]).to(K.device)
        return K[order][:, order]


def kfac_factors(model: nn.Module, criterion: Callable[[Any, Any], Tensor], data: Any, fisher: str = "empirical",
                 seed: int | None = None, *, output_fn: Callable[[Any], Tensor] | None = None,
                 max_factor_size: int | None = DEFAULT_MAX_FACTOR_SIZE) -> dict[str, KroneckerOperator]:
    """K-FAC factors of every Linear, Conv1D, Conv2d and Embedding layer of `model` on `data`.

    Args:
        model: the network; it is left as it was (hooks are removed, no mode change).
        criterion: `criterion(outputs, targets)` returning the batch-mean loss.
        data: one `(inputs, targets)` batch or an iterable of them; batches are weighted by size.
            Tensor inputs are passed as `model(inputs)`, a dict as `model(**inputs)`.
        fisher: "empirical" (output gradients of `criterion` on the targets) or "mc" (the true
            Fisher: labels drawn from the model's softmax, outputs = logits with classes last,
            (N, C) or (N, T, V); Martens & Grosse 2015). Default "empirical", as
            gpauloski/kfac-pytorch: it needs only the criterion, so it holds for any loss (a
            regression's MSE included), where "mc", the paper's, assumes a softmax cross-entropy.
            On one sample A (x) G is exactly that sample's empirical Fisher block
            (tests/curvature/test_curvature_defaults.py checks both held-out problems).
        seed: the label sampler's seed for "mc" (None draws one).
        output_fn: `output_fn(model outputs) -> tensor`, what the criterion sees; default: a
            tensor as it is, a Hugging Face ModelOutput's `logits`.
        max_factor_size: layers with a factor of more rows than this get no factors (named in a
            warning with the size); None: no limit. Default `DEFAULT_MAX_FACTOR_SIZE`.

    Returns:
        {layer name: KroneckerOperator}, with the conventions of this module's docstring. Linear-like
        layers that get none (tied weights, too large, ...) are named in a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(criterion):
        raise TypeError(f"criterion: expected a callable criterion(outputs, targets), got {type(criterion).__name__}")
    check_choice("fisher", fisher, FISHERS)
    _, gen = make_generator(seed)
    trained_ids = {id(p) for p in model.parameters() if p.requires_grad}
    layers, reasons = candidate_layers(model, trained_ids, max_factor_size)
    skipped = [f"{name} ({why})" for name, why in reasons.items()
               if id(model.get_submodule(name).weight) in trained_ids]
    if skipped:
        warnings.warn(f"kfac_factors: these layers get no factors: {', '.join(skipped)}", UserWarning, stacklevel=2)
    if not layers:
        raise ValueError("model: has no trainable nn.Linear, Conv1D or nn.Conv2d layer that can be preconditioned")
    first = layers[0].module.weight
    sums: dict[int, list[Tensor]] = {}
    total = 0
    for index, (count, batch) in enumerate(Batches(data)):
        x, y = split_batch(move_batch(batch, first.device, first.dtype), index)
        with torch.enable_grad(), LayerCapture(layers) as capture:
            outputs = model_output(call_model(model, x), output_fn)
            if fisher == "mc":
                sampled_label_backward(capture, outputs, gen)
            else:
                loss = criterion(outputs, y)
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
    return {layers[i].name: KroneckerOperator(A / total, G / total, layers[i].weight_shape, layers[i].has_bias)
            for i, (A, G) in sums.items()}
