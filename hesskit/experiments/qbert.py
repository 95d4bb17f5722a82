"""Notebook 12 (`12_qbert_groupwise.ipynb`): Q-BERT on a tiny transformer, group-wise quantization,
Hessian-eigenvalue sensitivity and quantization-aware fine-tuning.

Q-BERT (Shen, Dong, Ye, Ma, Yao, Gholami, Mahoney & Keutzer, "Q-BERT: Hessian Based Ultra Low
Precision Quantization of BERT", AAAI 2020) makes BERT survive 2-3-bit weights with three ideas:

* **group-wise quantization**: every weight matrix is split along its output rows into groups and
  each group gets its own range (scale). For the fused attention projection, whose rows are
  [Q heads | K heads | V heads], one group per head means `group_size = dim // heads` rows; finer
  groups bucket contiguous rows inside a head; the limit is one range per output row;
* **Hessian sensitivity**: the top Hessian eigenvalue lambda_i of each layer's weight block, by
  power iteration on several data subsets, summarised as Omega_i = |mean lambda_i| + std lambda_i;
  more sensitive layers get more bits (the "2/3 MP" and "3/4 MP" configurations);
* **quantization-aware fine-tuning** with the straight-through estimator.

Here the model is `hk.models.TinyTransformer` (one pre-LN block, `attn.qkv` fused) trained on
`hk.data.sequences` ("which token is most frequent"). The four matrices of the block
(`ENCODER`) are quantized to b bits; the token embedding and the classifier head stay at 8 bits
(`outer_bits`; Q-BERT keeps embeddings at 8 bits, and the first and last layers of a network are
conventionally kept at 8 bits); positions, biases and LayerNorms stay in float32.

Q-BERT's sensitivity itself is `hk.quant.sensitivities(..., metric="qbert")`
(hesskit/quant/sensitivity.py); the notebook writes its power iteration inline and checks it
against that and `hk.eigenvalues`. The functions here are pure (they return new models and results
and never touch their inputs), so that benchmarks can reuse them. The studies: the trained task
(`train_tiny_transformer`), the grouping ablation (`group_sweep`), every low/high mixed-precision
configuration (`mixed_precision`) and quantization-aware fine-tuning (`qat_finetune`), every
accuracy scored by `hesskit.experiments.tasks.evaluate`; the explorer is
`hesskit.widgets.qbert.QBERTExplorer`.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from ..data import sequences
from ..models import TinyTransformer
from ..quant import freeze, model_size, quantization_aware, quantize_model
from .tasks import TrainedModel, evaluate
from .training import run_to_end, training_steps

__all__ = [
    "ENCODER",
    "OUTER",
    "rows_per_head",
    "train_tiny_transformer",
    "group_options",
    "ranges_per_matrix",
    "quantize_transformer",
    "TransformerSize",
    "transformer_size",
    "GroupSweep",
    "group_sweep",
    "MixedPrecision",
    "mixed_precision",
    "QATRun",
    "qat_finetune",
]

ENCODER = ("attn.qkv", "attn.out", "mlp.0", "mlp.2")  # the block's weight matrices: quantized to b bits
OUTER = ("embed", "head")  # token embedding and classifier: kept at `outer_bits` (8)

Pair = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------- the task and the model
def rows_per_head(model: TinyTransformer) -> int:
    """Rows of the fused qkv projection per attention head: `dim // heads`."""
    return model.embed.embedding_dim // model.attn.heads


def _minibatch_step(model: nn.Module, opt: torch.optim.Optimizer, schedule: Any, train: Pair, batch_size: int,
                    seed: int) -> Callable[[int], Tensor]:
    """One step of `training_steps` for this notebook's trainers: cross-entropy on `batch_size`
    sequences drawn with replacement (a generator seeded by `seed`), then the lr schedule's step."""
    gen = torch.Generator().manual_seed(seed)

    def step(t: int) -> Tensor:
        idx = torch.randint(0, len(train[0]), (batch_size,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(train[0][idx]), train[1][idx])
        loss.backward()
        opt.step()
        schedule.step()
        return loss

    return step


def train_tiny_transformer(seed: int = 0, vocab: int = 8, length: int = 16, dim: int = 32, heads: int = 8,
                           mlp_ratio: int = 2, steps: int = 1000, batch_size: int = 128, lr: float = 3e-3,
                           weight_decay: float = 0.01, num_train: int = 4096, num_test: int = 2048,
                           data_seed: int = 0) -> TrainedModel:
    """Train `hk.models.TinyTransformer(vocab, dim=dim, heads=heads, max_length=length)` on
    `hk.data.sequences` (label: the most frequent of `length` tokens from a vocabulary of `vocab`)
    with AdamW (lr `lr`, cosine decay to 0, weight decay 0.01) on random batches of
    `batch_size`. The defaults (8 tokens, length 16, dim 32, 8 heads of 4 dimensions: 9,640
    parameters) reach (nearly) 100% test accuracy in seconds on one CPU thread and lose many
    points when the block's weights are rounded to 2 bits (notebook 12 prints how many).

    `seed` sets the initialisation and the batch order, `data_seed` the data set (train and test
    are disjoint parts of one seeded draw). The steps run in `training.training_steps` (the
    shared loop: a non-finite loss ends the run, the later losses stay nan). Returns a
    `tasks.TrainedModel`: the model in eval mode, its per-step training `losses`, `train_seconds`,
    the arguments as `config` and its `test_metrics` (the float model's test accuracy)."""
    if steps < 1 or batch_size < 1 or num_train < batch_size or num_test < 1:
        raise ValueError(f"steps, batch_size, num_train, num_test: expected positive sizes with "
                         f"batch_size <= num_train, got {steps}, {batch_size}, {num_train}, {num_test}")
    x, y = sequences(n=num_train + num_test, length=length, vocab=vocab, seed=data_seed)
    train, test = (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:])
    torch.manual_seed(seed)
    model = TinyTransformer(vocab=vocab, dim=dim, heads=heads, max_length=length, mlp_ratio=mlp_ratio)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    step = _minibatch_step(model, opt, schedule, train, batch_size, seed)
    start = time.perf_counter()
    model.train()
    log = run_to_end(training_steps(step, steps, label="training step"))
    seconds = time.perf_counter() - start
    model.eval()
    for p in model.parameters():
        p.grad = None
    config = dict(seed=seed, vocab=vocab, length=length, dim=dim, heads=heads, mlp_ratio=mlp_ratio, steps=steps,
                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, num_train=num_train, num_test=num_test,
                  data_seed=data_seed)
    return TrainedModel(model, train, test, seed, seconds, log.loss, config, evaluate(model, test))


# --------------------------------------------------------------------------- group-wise quantization
def group_options(model: TinyTransformer) -> dict[str, int | None]:
    """Q-BERT's groupings as rows per group: one range per matrix (None), one per head
    (`dim // heads` rows), half a head (Q-BERT's "d / (2 N_h)" buckets) and one per row (1)."""
    rows = rows_per_head(model)
    options: dict[str, int | None] = {"1 per matrix": None, "per head": rows}
    if rows % 2 == 0 and rows > 2:
        options["half head"] = rows // 2
    options["per row"] = 1
    return options


def _granularity(group_size: int | None) -> tuple[str, int | None]:
    if group_size is None:
        return "tensor", None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected None (one range per matrix) or a positive number of rows, "
                         f"got {group_size!r}")
    return "rows", group_size


def _encoder_bits(bits: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(ENCODER))
        if unknown:
            raise ValueError(f"bits: unknown matrices {unknown}; expected names from {ENCODER}")
        return {name: bits[name] for name in ENCODER if name in bits}
    return {name: bits for name in ENCODER}


def ranges_per_matrix(model: TinyTransformer, group_size: int | None) -> dict[str, int]:
    """How many ranges (scales) each block matrix gets: its output rows / `group_size` (1 for None)."""
    _granularity(group_size)
    layers = dict(model.named_modules())
    out = {}
    for name in ENCODER:
        rows = layers[name].weight.shape[0]
        if group_size is not None and rows % group_size:
            raise ValueError(f"group_size: expected a divisor of the {rows} output rows of {name}, got {group_size}")
        out[name] = 1 if group_size is None else rows // group_size
    return out


def quantize_transformer(model: TinyTransformer, bits: int | Mapping[str, int], group_size: int | None = None,
                         outer_bits: int | None = 8, symmetric: bool = True) -> TinyTransformer:
    """A copy of the transformer with the block's matrices (`ENCODER`) rounded to `bits` (one width
    or {matrix: width}, e.g. a mixed-precision configuration) with one range per `group_size`
    consecutive output rows (None: one range per matrix), and the embedding and the head rounded to
    `outer_bits` with one range each (None: left in float). Round-to-nearest, no data needed."""
    granularity, group_size = _granularity(group_size)
    ranges_per_matrix(model, group_size)
    quantized = quantize_model(model, _encoder_bits(bits), granularity, group_size, symmetric)
    if outer_bits is not None:
        quantized = quantize_model(quantized, {name: outer_bits for name in OUTER}, "tensor", None, symmetric)
    return quantized


@dataclass
class TransformerSize:
    """Storage of `quantize_transformer(...)`, in bits (from `hk.quant.model_size`, 16-bit scales).

    encoder_weight_bits: n_i b_i summed over the block's matrices; encoder_scale_bits: one scale
    (and for asymmetric grids one zero point) per group; outer_bits: the embedding and head, weights
    and scales; float_bits: everything else (positions, biases, LayerNorms) in float32;
    float32_bits: the whole model in float32."""

    encoder_weight_bits: int
    encoder_scale_bits: int
    encoder_weights: int
    outer_bits: int
    float_bits: int
    float32_bits: int

    @property
    def total_bits(self) -> int:
        return self.encoder_weight_bits + self.encoder_scale_bits + self.outer_bits + self.float_bits

    @property
    def encoder_bits_per_weight(self) -> float:
        """(weights + scales) / weights of the block: b plus the scale overhead."""
        return (self.encoder_weight_bits + self.encoder_scale_bits) / self.encoder_weights

    @property
    def kilobytes(self) -> float:
        return self.total_bits / 8 / 1024

    @property
    def compression(self) -> float:
        """How many times smaller than the float32 model."""
        return self.float32_bits / self.total_bits


def transformer_size(model: TinyTransformer, bits: int | Mapping[str, int], group_size: int | None = None,
                     outer_bits: int | None = 8, symmetric: bool = True, scale_bits: int = 16) -> TransformerSize:
    """The exact size of `quantize_transformer(model, bits, group_size, outer_bits, symmetric)`, scale
    overhead included: each group stores a `scale_bits`-bit scale, so a matrix of n weights in G
    groups costs n b + G * scale_bits bits (plus G b-bit zero points if asymmetric)."""
    granularity, group_size = _granularity(group_size)
    ranges_per_matrix(model, group_size)
    widths = _encoder_bits(bits)
    encoder = model_size(model, widths, granularity, group_size, symmetric, scale_bits)
    if outer_bits is None:
        outer_total, every = 0, widths
    else:
        outer = model_size(model, {name: outer_bits for name in OUTER}, "tensor", None, symmetric, scale_bits)
        outer_total, every = outer.weight_bits + outer.overhead_bits, {**widths, **{n: outer_bits for n in OUTER}}
    rest = model_size(model, every, "tensor", None, symmetric, scale_bits).float_bits
    float32 = sum(p.numel() for p in model.parameters()) * 32
    return TransformerSize(encoder.weight_bits, encoder.overhead_bits, encoder.quantized_weights, outer_total, rest,
                           float32)


@dataclass
class GroupSweep:
    """Accuracy and size for every (bits[i], group_sizes[j]): `accuracy[i, j]`, `size[i][j]`
    (a `TransformerSize`); `qkv_ranges[j]` is the number of ranges of the fused qkv matrix."""

    bits: list[int]
    group_sizes: list[int | None]
    labels: list[str]
    qkv_ranges: np.ndarray
    accuracy: np.ndarray
    size: list[list[TransformerSize]]
    fp_accuracy: float

    def bits_per_weight(self) -> np.ndarray:
        """Block bits per weight including the scales, (len(bits), len(group_sizes))."""
        return np.array([[s.encoder_bits_per_weight for s in row] for row in self.size])


def group_sweep(model: TinyTransformer, data: Pair, bits_list: Sequence[int], group_sizes: Sequence[int | None],
                outer_bits: int | None = 8, symmetric: bool = True, labels: Sequence[str] | None = None) -> GroupSweep:
    """Round-to-nearest accuracy on `data` of `quantize_transformer(model, b, g, outer_bits)` for
    every b in `bits_list` and group size g in `group_sizes` (rows per range; None: one range per
    matrix), with the exact model size of each (Q-BERT's group-wise ablation)."""
    bits_list, group_sizes = [operator.index(b) for b in bits_list], list(group_sizes)
    if not bits_list or not group_sizes:
        raise ValueError("bits_list, group_sizes: expected at least one value each")
    if labels is None:
        names = {v: k for k, v in group_options(model).items()}
        labels = [names.get(g, f"{g} rows") for g in group_sizes]
    qkv_rows = model.attn.qkv.weight.shape[0]
    acc = np.zeros((len(bits_list), len(group_sizes)))
    sizes = []
    for i, b in enumerate(bits_list):
        row = []
        for j, g in enumerate(group_sizes):
            acc[i, j] = evaluate(quantize_transformer(model, b, g, outer_bits, symmetric), data).accuracy
            row.append(transformer_size(model, b, g, outer_bits, symmetric))
            progress.report(i * len(group_sizes) + j + 1, len(bits_list) * len(group_sizes), "rounding: grouping")
        sizes.append(row)
    qkv = np.array([1 if g is None else qkv_rows // g for g in group_sizes])
    return GroupSweep(bits_list, group_sizes, list(labels), qkv, acc, sizes, evaluate(model, data).accuracy)


# --------------------------------------------------------------------------- mixed precision
@dataclass
class MixedPrecision:
    """Every assignment of `low` or `high` bits to the block's matrices: `configs[c]` is a
    {matrix: bits} dict, `accuracy[c]` its test accuracy, `bits_per_weight[c]` the block's bits
    per weight with scales. `path(order)` gives the configurations that raise the first k matrices
    of `order` to `high`, k = 0..L (Q-BERT: more bits to the larger Omega)."""

    names: list[str]
    low: int
    high: int
    group_size: int | None
    configs: list[dict[str, int]]
    accuracy: np.ndarray
    bits_per_weight: np.ndarray
    kilobytes: np.ndarray

    def index(self, config: Mapping[str, int]) -> int:
        return self.configs.index({n: config[n] for n in self.names})

    def path(self, order: Sequence[str]) -> list[int]:
        if sorted(order) != sorted(self.names):
            raise ValueError(f"order: expected a permutation of {self.names}, got {list(order)}")
        return [self.index({n: self.high if n in order[:k] else self.low for n in self.names})
                for k in range(len(order) + 1)]


def mixed_precision(model: TinyTransformer, data: Pair, low: int = 2, high: int = 3, group_size: int | None = None,
                    outer_bits: int | None = 8, names: Sequence[str] = ENCODER) -> MixedPrecision:
    """Accuracy and size of all 2^L configurations of `low`/`high` bits over the matrices `names`
    (the exhaustive ground truth a sensitivity-ordered choice is compared with; 16 for L = 4)."""
    names = list(names)
    if low >= high:
        raise ValueError(f"low, high: expected low < high, got {low} and {high}")
    configs, acc, bpw, kb = [], [], [], []
    for k, choice in enumerate(itertools.product((low, high), repeat=len(names)), start=1):
        config = dict(zip(names, choice))
        size = transformer_size(model, config, group_size, outer_bits)
        configs.append(config)
        acc.append(evaluate(quantize_transformer(model, config, group_size, outer_bits), data).accuracy)
        bpw.append(size.encoder_bits_per_weight)
        kb.append(size.kilobytes)
        progress.report(k, 2 ** len(names), "configuration")  # shown while an explorer renders
    return MixedPrecision(names, low, high, group_size, configs, np.array(acc), np.array(bpw), np.array(kb))


# --------------------------------------------------------------------------- quantization-aware fine-tuning
@dataclass
class QATRun:
    """Test accuracy of the quantized model at `steps` (0: round-to-nearest before fine-tuning);
    `model` is the final quantized model (`hk.quant.freeze` of the QAT model)."""

    bits: int | dict[str, int]
    group_size: int | None
    lr: float
    steps: np.ndarray
    accuracy: np.ndarray
    losses: np.ndarray
    model: nn.Module
    seconds: float

    @property
    def final_accuracy(self) -> float:
        return float(self.accuracy[-1])


def qat_finetune(model: TinyTransformer, train: Pair, test: Pair, bits: int | Mapping[str, int],
                 group_size: int | None = None, outer_bits: int | None = 8, steps: int = 300, lr: float = 1e-3,
                 batch_size: int = 128, eval_every: int = 25, seed: int = 0, symmetric: bool = True) -> QATRun:
    """Quantization-aware fine-tuning with the straight-through estimator (Q-BERT fine-tunes the
    quantized BERT this way; STE: Bengio, Leonard & Courville 2013): a copy whose block matrices
    (and embedding and head, at `outer_bits`) compute with their fake-quantized weights
    (`hk.quant.quantization_aware`), trained by AdamW (`lr` decayed linearly to 0 as in BERT's
    fine-tuning recipe, no weight decay) on random
    batches of `train`. The float weights are what the optimizer updates; the gradient passes the
    rounding unchanged. Every `eval_every` steps (and after the last) the frozen quantized model is
    evaluated on `test`; the steps run in `training.training_steps`. The grids are symmetric by
    default, as `quantize_transformer`'s (Q-BERT's; `hk.quant`'s own default is asymmetric)."""
    if steps < 0 or eval_every < 1:
        raise ValueError(f"steps, eval_every: expected steps >= 0 and eval_every >= 1, got {steps}, {eval_every}")
    granularity, group_size = _granularity(group_size)
    ranges_per_matrix(model, group_size)
    qat = quantization_aware(model, _encoder_bits(bits), granularity=granularity, group_size=group_size,
                             symmetric=symmetric)
    if outer_bits is not None:
        qat = quantization_aware(qat, {name: outer_bits for name in OUTER}, granularity="tensor", symmetric=symmetric)
    qat.train()
    opt = torch.optim.AdamW(qat.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / max(steps, 1))
    step = _minibatch_step(qat, opt, schedule, train, batch_size, seed)
    checkpoints, accs, losses = [], [], np.zeros(0)

    def checkpoint(t: int) -> None:
        checkpoints.append(t)
        accs.append(evaluate(freeze(qat), test).accuracy)

    start = time.perf_counter()
    checkpoint(0)
    if steps:  # progress, shown while an explorer renders: a run of 500 steps takes seconds
        plan = set(range(eval_every, steps + 1, eval_every)) | {steps}
        losses = run_to_end(training_steps(step, steps, checkpoints=plan, at_checkpoint=checkpoint,
                                           label="QAT step")).loss
    seconds = time.perf_counter() - start
    final = freeze(qat).eval()
    for p in final.parameters():
        p.grad = None
    widths = dict(bits) if isinstance(bits, Mapping) else int(bits)
    return QATRun(widths, group_size, float(lr), np.array(checkpoints), np.array(accs), losses, final, seconds)
