"""Notebook 15 (`15_your_own_model.ipynb`): the second-order picture of your own Hugging Face
model, on a small BERT.

A researcher who brings a `transformers` model wants the same few things from hesskit: which
blocks are sharp (per-block Hessian traces and top eigenvalues, grouped as embeddings /
attention / MLP / LayerNorm / head, also per parameter), the spectrum of the whole Hessian,
which layers tolerate fewer bits (Q-BERT's sensitivity, a bit allocation, GPTQ against
round-to-nearest) and whether a second-order optimizer (Sophia-G) helps fine-tuning. This module
holds what the notebook measures, as pure functions of a model and its data (they return new
models and results and never touch their inputs); `hesskit.widgets.your_model` holds the explorer.

The studies:

- the task and the model: `token_task`, `tiny_bert`, `train_bert` (a `BertTask`), scored by
  `hesskit.experiments.tasks.evaluate` (dict inputs are passed as `model(**inputs)`);
- blocks and groups: `block_group`, `block_layer`, `block_sets`, `block_curvature` (a
  `BlockCurvature`), `whole_spectrum`;
- quantization: `encoder_layers`, `quantize_bert`, `mixed_precision` (a `MixedPrecisionResult` of
  `QuantRow`s), `gptq_vs_rtn` (a `GPTQResult`);
- continued fine-tuning: `continue_finetuning` (a `training.TrainingRun`; `step_seconds` reads
  its time), `sophia_vs_adamw`;
- what the explorer computes: `estimate_block` for one block by one of `ESTIMATORS` (the traces of
  `TRACE_METHODS`, Lanczos' top eigenvalue, the GGN diagonals of `DIAGONAL_METHODS`), and
  `group_estimates` for every block of a group.

The model is `transformers.BertForSequenceClassification` built from a `BertConfig` (random
weights, nothing downloaded; SDPA attention, the default), fine-tuned on a synthetic task made
by code: each sequence is `[CLS]` followed by 8-16 tokens drawn as in `hk.data.sequences` and
right-padded to a fixed length, and its label is the most frequent token. BERT classifies from
the `[CLS]` position, so the label can only be read off through attention. Inputs are the dicts
Hugging Face models take, `{"input_ids", "attention_mask"}`, and hesskit calls `model(**inputs)`.

Nothing here is specific to BERT except `GROUP_RULES`, the name patterns that sort modules into
groups; they also cover GPT-2 and Llama names (`attn`, `mlp`, `ln_`, `norm`, `wte`, `lm_head`).

References: Vaswani et al., NeurIPS 2017 (the transformer); Devlin et al., NAACL 2019 (BERT);
Yao et al., IEEE BigData 2020 (PyHessian: per-block traces and eigenvalues); Ghorbani, Krishnan &
Xiao, ICML 2019 (spectral density); Dong et al., ICCV 2019 (HAWQ); Shen et al., AAAI 2020
(Q-BERT); Frantar et al., ICLR 2023 (GPTQ); Liu et al., ICLR 2024 (Sophia).
"""

from __future__ import annotations

import copy
import math
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from ..curvature.density import spectral_density
from ..curvature.eigen import eigenvalues
from ..curvature.operators import GGNOperator, HessianOperator
from ..curvature.trace import MIN_MATVECS, diagonal, trace
from ..data import sequences
from ..optim import Sophia
from ..optim.closures import make_closure
from ..quant import allocate_bits, gptq, model_size, quantizable_layers, quantize_model, sensitivities
from ..quant.gptq import round_to_nearest
from .tasks import TrainedModel, evaluate
from .training import StepLog, TrainingRun, run_plan, run_to_end, training_steps

__all__ = [
    "PAD",
    "CLS",
    "CRITERION",
    "GROUPS",
    "GROUP_RULES",
    "token_task",
    "select",
    "tiny_bert",
    "BertTask",
    "train_bert",
    "block_group",
    "block_layer",
    "block_sets",
    "BlockCurvature",
    "block_curvature",
    "whole_spectrum",
    "encoder_layers",
    "quantize_bert",
    "QuantRow",
    "MixedPrecisionResult",
    "mixed_precision",
    "GPTQResult",
    "gptq_vs_rtn",
    "OPTIMIZERS",
    "continue_finetuning",
    "step_seconds",
    "sophia_vs_adamw",
    "ESTIMATORS",
    "TRACE_METHODS",
    "EIGENVALUE",
    "DIAGONAL_METHODS",
    "MIN_PRODUCTS",
    "estimate_block",
    "group_estimates",
]

PAD, CLS = 0, 1  # token ids; the sequence tokens are 2 .. vocab + 1
CRITERION = nn.CrossEntropyLoss()
GROUPS = ("embeddings", "attention", "MLP", "LayerNorm", "head")
# (group, pattern) pairs tried in order on a module's name: the first match wins. BERT first, then
# GPT-2 / Llama spellings. Edit these for a model with other names.
GROUP_RULES = (
    ("LayerNorm", r"layernorm|layer_norm|(^|\.)ln_|norm($|\.)"),
    ("embeddings", r"embed|(^|\.)wte$|(^|\.)wpe$"),
    ("attention", r"attention|attn"),
    ("MLP", r"intermediate|\.output\.dense|mlp|ffn|feed_forward"),
    ("head", r"pooler|classifier|lm_head|score|(^|\.)head"),
)

Pair = tuple[dict, Tensor]


# --------------------------------------------------------------------------- the task and the model
def token_task(n: int, vocab: int = 6, min_length: int = 8, max_length: int = 16, seed: int = 0) -> Pair:
    """`n` padded sequences and their labels, as a tokenizer would hand them to a Hugging Face model.

    Tokens come from `hk.data.sequences(n, max_length, vocab, seed)` (uneven token frequencies per
    sequence); each sequence keeps a seeded random length in [min_length, max_length], gets a
    `[CLS]` token (id 1) in front and `[PAD]` tokens (id 0) after it, with `attention_mask` 0 on
    the padding. Token v is id v + 2. The label is the most frequent of the kept tokens (ties go to
    the smallest), 0 .. vocab - 1. Returns ({"input_ids", "attention_mask"} of shape
    (n, max_length + 1), labels (n,))."""
    if not 1 <= min_length <= max_length:
        raise ValueError(f"min_length, max_length: expected 1 <= min_length <= max_length, got {min_length}, "
                         f"{max_length}")
    if n < 1 or vocab < 2:
        raise ValueError(f"n, vocab: expected n >= 1 and vocab >= 2, got {n}, {vocab}")
    tokens, _ = sequences(n=n, length=max_length, vocab=vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=gen)
    mask = (torch.arange(max_length)[None] < lengths[:, None]).long()
    counts = (nn.functional.one_hot(tokens, vocab) * mask[..., None]).sum(1)
    labels = torch.argmax(counts * (vocab + 1) - torch.arange(vocab), dim=1)
    ids = torch.where(mask.bool(), tokens + 2, torch.full_like(tokens, PAD))
    ones = torch.ones(n, 1, dtype=torch.long)
    return {"input_ids": torch.cat([CLS * ones, ids], 1), "attention_mask": torch.cat([ones, mask], 1)}, labels


def select(inputs: Mapping[str, Tensor], index: Any) -> dict[str, Tensor]:
    """The rows `index` (an index tensor or a slice) of every tensor of a dict batch."""
    return {k: v[index] for k, v in inputs.items()}


def tiny_bert(vocab: int = 6, max_length: int = 16, num_labels: int | None = None, hidden: int = 32,
              layers: int = 2, heads: int = 4, dropout: float = 0.1, attn_implementation: str = "sdpa",
              seed: int = 0) -> nn.Module:
    """A randomly initialised `transformers.BertForSequenceClassification` for `token_task`: a
    vocabulary of vocab + 2 ids ([PAD], [CLS] and the tokens), positions for max_length + 1
    tokens, `layers` encoder layers of width `hidden` with `heads` heads and a 2 x hidden MLP,
    BERT's default dropout 0.1 and SDPA attention. The defaults have 19,270 parameters."""
    import transformers

    transformers.logging.set_verbosity_error()  # the "newly initialized weights" notice: no checkpoint here
    config = transformers.BertConfig(
        vocab_size=vocab + 2, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=max_length + 1,
        num_labels=vocab if num_labels is None else num_labels, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, pad_token_id=PAD, attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng():  # seeded initialisation; the global random state is left as it was
        torch.manual_seed(seed)
        return transformers.BertForSequenceClassification(config)


@dataclass
class BertTask:
    """A fine-tuned BERT (`trained`, a `tasks.TrainedModel`: the model in eval mode with no `.grad`,
    its data, seed, fine-tuning time, the training loss of every step and the arguments) with its
    learning curve: the test accuracy `test_accuracy` at steps `checkpoints`."""

    trained: TrainedModel
    checkpoints: np.ndarray
    test_accuracy: np.ndarray

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.trained.model.parameters())

    @property
    def heads(self) -> int:
        return self.trained.model.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.trained.model.config.hidden_size // self.heads

    def curvature_batches(self, num_batches: int, batch_size: int, offset: int = 0) -> list[Pair]:
        """`num_batches` consecutive (inputs, labels) batches of the training set from row `offset`:
        the data the curvature is measured on (a list of batches, as hesskit takes it)."""
        inputs, labels = self.trained.train
        if num_batches < 1 or batch_size < 1 or offset + num_batches * batch_size > len(labels):
            raise ValueError(f"num_batches, batch_size, offset: {num_batches} x {batch_size} from {offset} does not "
                             f"fit the {len(labels)} training sequences")
        return [(select(inputs, slice(s, s + batch_size)), labels[s:s + batch_size])
                for s in range(offset, offset + num_batches * batch_size, batch_size)]


def _schedule(opt: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """BERT's fine-tuning schedule: linear warm-up over a fraction `warmup` of the steps, then
    linear decay to 0."""
    ramp = max(1, int(round(warmup * steps)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / ramp) * max(0.0, 1 - s / steps))


def train_bert(seed: int = 0, steps: int = 500, batch_size: int = 64, lr: float = 5e-3, weight_decay: float = 0.01,
               warmup: float = 0.1, num_train: int = 4096, num_test: int = 1024, vocab: int = 6,
               min_length: int = 8, max_length: int = 16, hidden: int = 32, layers: int = 2, heads: int = 4,
               dropout: float = 0.1, eval_every: int = 50, data_seed: int = 0) -> BertTask:
    """Fine-tune `tiny_bert(...)` on `token_task` with AdamW (BERT's recipe: warm-up, then linear
    decay; dropout on, train mode) on seeded batches of `batch_size`, evaluating the test accuracy
    every `eval_every` steps. Train and test are disjoint parts of one draw (`data_seed`); `seed`
    sets the initialisation and the batch order. The defaults reach about 90% test accuracy in
    10-15 s on one CPU thread. A run that diverges (a non-finite loss) raises a RuntimeError."""
    if steps < 1 or batch_size < 1 or num_train < batch_size or num_test < 1 or eval_every < 1:
        raise ValueError(f"steps, batch_size, num_train, num_test, eval_every: expected positive sizes with "
                         f"batch_size <= num_train, got {steps}, {batch_size}, {num_train}, {num_test}, {eval_every}")
    train, test = _split_task(num_train, num_test, vocab, min_length, max_length, data_seed)
    model = tiny_bert(vocab, max_length, hidden=hidden, layers=layers, heads=heads, dropout=dropout, seed=seed)
    log, checkpoints, accuracy, seconds = _fine_tune(model, train, test, steps, batch_size, lr, weight_decay,
                                                     warmup, eval_every, seed)
    if log.diverged:
        raise RuntimeError(f"train_bert: the fine-tuning diverged ({log.message}); lower lr (got {lr})")
    model.eval().zero_grad(set_to_none=True)
    config = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                  num_train=num_train, num_test=num_test, vocab=vocab, min_length=min_length, max_length=max_length,
                  hidden=hidden, layers=layers, heads=heads, dropout=dropout, data_seed=data_seed)
    trained = TrainedModel(model, train, test, seed, seconds, log.loss, config)
    return BertTask(trained, np.array(checkpoints), np.array(accuracy))


def _split_task(num_train: int, num_test: int, vocab: int, min_length: int, max_length: int, data_seed: int
                ) -> tuple[Pair, Pair]:
    """`train_bert`'s data: one `token_task` draw, its first `num_train` sequences to train on and
    the rest to test on."""
    inputs, labels = token_task(num_train + num_test, vocab, min_length, max_length, seed=data_seed)
    train = (select(inputs, slice(0, num_train)), labels[:num_train])
    test = (select(inputs, slice(num_train, None)), labels[num_train:])
    return train, test


def _loss_outputs(model: nn.Module, batch: Pair) -> Callable[[], tuple[Tensor, Any]]:
    """The forward pass of one (dict inputs, labels) batch for `make_closure`: (loss, outputs), with
    outputs the Hugging Face ModelOutput."""

    def compute():
        outputs = model(**batch[0])  # a SequenceClassifierOutput
        return CRITERION(outputs.logits, batch[1]), outputs

    return compute


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, kind: str, schedule: torch.optim.lr_scheduler.LRScheduler,
                train: Pair, idx: Tensor) -> Tensor:
    """One step of `train_bert` and `continue_finetuning` (the `step` of `training_steps`): the rows
    `idx` of `train`, train mode (dropout on), `opt.step` on the closure `make_closure(kind, ...)`,
    then the lr schedule's step. Returns the loss."""
    batch = select(train[0], idx), train[1][idx]
    model.train()
    loss = opt.step(make_closure(kind, opt, _loss_outputs(model, batch)))
    schedule.step()
    return loss


def _seeded_run(run: Any, seed: int) -> StepLog:
    """`run_to_end(run)` (a `training_steps` generator) with the global generator seeded by `seed`
    (the dropout masks); the global random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return run_to_end(run)


def _fine_tune(model: nn.Module, train: Pair, test: Pair, steps: int, batch_size: int, lr: float,
               weight_decay: float, warmup: float, eval_every: int, seed: int
               ) -> tuple[StepLog, list[int], list[float], float]:
    """`train_bert`'s run: `training_steps` of AdamW with `_schedule` on `model` (in place) on the
    batches of `run_plan(..., seed)`, dropout masks seeded by `seed`, the test accuracy at step 0
    and at the plan's checkpoints. Returns the `StepLog` (the loss of every step), the checkpoints,
    the test accuracy at each and the seconds the run took (evaluations included)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = _schedule(opt, steps, warmup)
    checkpoints, accuracy = [0], [evaluate(model, test).accuracy]
    start = time.perf_counter()
    order, plan = run_plan(len(train[1]), steps, batch_size, eval_every, seed)

    def at_checkpoint(t: int) -> None:
        checkpoints.append(t)
        accuracy.append(evaluate(model, test).accuracy)

    run = training_steps(lambda t: _train_step(model, opt, "backward", schedule, train, order[t - 1]), steps,
                         checkpoints=plan, at_checkpoint=at_checkpoint, label="fine-tuning step")
    return _seeded_run(run, seed), checkpoints, accuracy, time.perf_counter() - start


# --------------------------------------------------------------------------- blocks and groups
def block_group(name: str, rules: Sequence[tuple[str, str]] = GROUP_RULES) -> str:
    """The group of a module name ("embeddings", "attention", "MLP", "LayerNorm", "head"; "other"
    if no rule matches): the first of `rules` whose pattern is found in the name."""
    for group, pattern in rules:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return group
    return "other"


def block_layer(name: str) -> str:
    """Which transformer layer a module belongs to: "layer k" for names with `.layer.k.`, `.h.k.`
    or `.layers.k.`; otherwise "embeddings" or "head" by `block_group` (a LayerNorm outside the
    layers goes with the embeddings if its name says so, else with the head), else "other"."""
    found = re.search(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.", name)
    if found:
        return f"layer {found.group(1)}"
    group = block_group(name)
    if group == "LayerNorm":  # a norm outside the layers: the embeddings' (BERT) or the final one (GPT-2, Llama)
        return "embeddings" if "embed" in name.lower() else "head"
    return group if group in ("embeddings", "head") else "other"


def block_sets(names: Sequence[str]) -> dict[str, list[str]]:
    """Module names grouped for the explorer: "embeddings" (with their LayerNorm), then for each
    layer "layer k · attention", "layer k · MLP", "layer k · LayerNorm", then "head"; in model order."""
    sets: dict[str, list[str]] = {}
    for name in names:
        layer, group = block_layer(name), block_group(name)
        key = layer if layer in ("embeddings", "head", "other") else f"{layer} · {group}"
        sets.setdefault(key, []).append(name)
    return sets


@dataclass
class BlockCurvature:
    """Per-block curvature of one operator: for each block (a module's parameters, `op.blocks()`)
    its name, group (`block_group`), layer, parameter count n, Hessian trace with its standard
    error (`hk.trace`) and top eigenvalue (largest algebraic, `hk.eigenvalues`) with its residual.
    `num_matvecs` counts the products of every block; `seconds` the wall time."""

    names: list[str]
    groups: list[str]
    layers: list[str]
    num_params: np.ndarray
    trace: np.ndarray
    trace_stderr: np.ndarray
    top: np.ndarray
    residual: np.ndarray
    num_matvecs: int
    seconds: float

    @property
    def trace_per_param(self) -> np.ndarray:
        """Tr(H_b) / n_b: the average eigenvalue of the block (HAWQ-V2's normalisation)."""
        return self.trace / self.num_params

    def by_group(self) -> dict[str, dict[str, float]]:
        """Per group: parameters, summed trace (its stderr: the blocks' added in quadrature, as if they
        were independent), trace per parameter, and the largest block top eigenvalue (a lower bound on
        the group block's own, by Cauchy interlacing)."""
        out = {}
        for group in [g for g in (*GROUPS, "other") if g in self.groups]:
            idx = [i for i, g in enumerate(self.groups) if g == group]
            n = int(self.num_params[idx].sum())
            tr = float(self.trace[idx].sum())
            out[group] = {"params": n, "trace": tr, "stderr": float(np.sqrt((self.trace_stderr[idx] ** 2).sum())),
                          "trace_per_param": tr / n, "top": float(self.top[idx].max())}
        return out


def block_curvature(op: HessianOperator, num_matvecs: int = 30, method: str = "xtrace", tol: float = 1e-3,
                    max_matvecs: int | None = None, seed: int = 0, by: str = "module") -> BlockCurvature:
    """`hk.trace(block, num_matvecs, method)` and `hk.eigenvalues(block, k=1, tol=tol)` for every
    block of `op.blocks(by)`. The method is `hk.trace`'s default, XTrace (a block of at most
    `num_matvecs` parameters then comes out exact, from its n unit vectors); "hutch++" and
    "hutchinson" are the others. A block whose Lanczos run stops before `tol` keeps its estimate
    (the residual says how far it is); its warning is not repeated here."""
    start, used = time.perf_counter(), 0
    names, n, tr, se, top, res = [], [], [], [], [], []
    blocks = list(op.blocks(by))
    for k, (name, block) in enumerate(blocks, start=1):
        t = trace(block, num_matvecs, method=method, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            e = eigenvalues(block, k=1, tol=tol, max_matvecs=max_matvecs, seed=seed)
        names.append(name)
        n.append(block.shape[0])
        tr.append(t.value)
        se.append(t.stderr)
        top.append(float(e.values[0]))
        res.append(float(e.residuals[0]))
        used += t.num_matvecs + e.num_matvecs
        progress.report(k, len(blocks), "block")  # shown while an explorer renders
    return BlockCurvature(names, [block_group(x) for x in names], [block_layer(x) for x in names], np.array(n),
                          np.array(tr), np.array(se), np.array(top), np.array(res), used,
                          time.perf_counter() - start)


def whole_spectrum(op: HessianOperator, num_runs: int = 4, num_steps: int = 40, k: int = 5, seed: int = 0) -> dict:
    """The whole Hessian's spectral density (`hk.spectral_density`, SLQ) and, as a check on its
    right edge, its top-k eigenvalues and most negative one by Lanczos (`hk.eigenvalues`)."""
    density = spectral_density(op, num_runs=num_runs, num_steps=num_steps, seed=seed)
    progress.report(1, 3, "spectral density, then Lanczos")  # shown while an explorer renders
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        top = eigenvalues(op, k=k, which="largest", seed=seed)
        progress.report(2, 3, "spectral density, then Lanczos")
        bottom = eigenvalues(op, k=1, which="smallest", seed=seed)
        progress.report(3, 3, "spectral density, then Lanczos")
    return {"density": density, "top": top, "bottom": bottom}


# --------------------------------------------------------------------------- quantization
def encoder_layers(model: nn.Module) -> list[str]:
    """The quantizable layers inside the transformer layers (attention and MLP matrices), in model
    order: what mixed precision and GPTQ work on. Embeddings and the head stay at 8 bits or float."""
    return [n for n in quantizable_layers(model) if block_group(n) in ("attention", "MLP")
            and block_layer(n).startswith("layer")]


def quantize_bert(model: nn.Module, bits: int | Mapping[str, int], head_dim: int, outer_bits: int | None = 8,
                  symmetric: bool = True) -> nn.Module:
    """A round-to-nearest copy: the encoder matrices (`encoder_layers`) at `bits` (one width or
    {layer: width}) with one range per `head_dim` consecutive output rows (Q-BERT's group-wise
    quantization: one range per head of the query, key and value matrices, the same row groups in
    the others), and the embeddings, pooler and classifier at `outer_bits` with one range each
    (None: left in float). Biases and LayerNorms stay float."""
    encoder = encoder_layers(model)
    widths = dict(bits) if isinstance(bits, Mapping) else dict.fromkeys(encoder, int(bits))
    unknown = sorted(set(widths) - set(encoder))
    if unknown:
        raise ValueError(f"bits: unknown layers {unknown}; expected names from encoder_layers(model)")
    quantized = quantize_model(model, widths, "rows", head_dim, symmetric)
    if outer_bits is not None:
        outer = [n for n in quantizable_layers(model) if n not in encoder]
        quantized = quantize_model(quantized, dict.fromkeys(outer, outer_bits), "tensor", None, symmetric)
    return quantized


@dataclass
class QuantRow:
    """One quantized model: how it was chosen, its encoder bits per weight (codes only, and with the
    16-bit scales counted), its test loss and accuracy."""

    method: str
    average_bits: float
    bits_per_weight: float
    loss: float
    accuracy: float
    bits: dict[str, int] = field(repr=False, default_factory=dict)


@dataclass
class MixedPrecisionResult:
    """Mixed precision against uniform bits on the same grids (`quantize_bert`). `sensitivity` is
    `hk.quant.sensitivities(...)` over `encoder_layers`, `allocation` the bits it gives under the
    budget; rows: float, uniform widths, the Hessian allocation and the curvature-free one."""

    sensitivity: Any
    allocation: Any
    rows: list[QuantRow]
    avg_bits: float

    def row(self, method: str) -> QuantRow:
        return next(r for r in self.rows if r.method == method)


def mixed_precision(model: nn.Module, data: Any, test: Pair, head_dim: int, avg_bits: float = 3.0,
                    choices: Sequence[int] = (2, 3, 4), metric: str = "qbert", num_subsets: int = 4,
                    uniform: Sequence[int] = (2, 3, 4), tol: float = 1e-3, seed: int = 0,
                    sensitivity: Any = None) -> MixedPrecisionResult:
    """Q-BERT-style mixed precision: the sensitivity of every encoder matrix
    (`hk.quant.sensitivities(model, CE, data, metric, num_subsets)`), HAWQ's exact allocation of
    `choices` under `avg_bits` weight bits per encoder weight (`hk.quant.allocate_bits` with the
    grids of `quantize_bert`), and, on the same grids, uniform `uniform` bits and the allocation
    that ignores curvature (every c_i = 1: only the rounding error ||Q(W) - W||^2 counts). A
    `sensitivity` computed before (over `encoder_layers`) is used as it is instead."""
    layers = encoder_layers(model)
    if sensitivity is None:
        sens = sensitivities(model, CRITERION, data, metric=metric, num_subsets=num_subsets, layers=layers, tol=tol,
                             seed=seed)
    elif sorted(sensitivity) != sorted(layers):
        raise ValueError(f"sensitivity: expected values for the encoder layers {layers}, got {list(sensitivity)}")
    else:
        sens, metric = sensitivity, getattr(sensitivity, "metric", metric)
    grids = dict(granularity="rows", group_size=head_dim, symmetric=True)  # quantize_bert's grids (Q-BERT's)
    allocation = allocate_bits(model, sens, avg_bits, tuple(choices), **grids)
    no_hessian = allocate_bits(model, dict.fromkeys(layers, 1.0), avg_bits, tuple(choices), **grids)

    def row(method: str, bits: Mapping[str, int] | None) -> QuantRow:
        if bits is None:
            scores = evaluate(model, test)
            return QuantRow(method, 32.0, 32.0, scores.loss, scores.accuracy)
        size = model_size(model, dict(bits), **grids)
        scores = evaluate(quantize_bert(model, dict(bits), head_dim), test)
        return QuantRow(method, size.average_bits, size.bits_per_weight, scores.loss, scores.accuracy,
                        bits=dict(bits))

    plans = [("float32", None), *[(f"uniform {b}-bit", dict.fromkeys(layers, b)) for b in uniform],
             (f"Hessian ({metric}) mixed", allocation), ("||ΔW||² only mixed", no_hessian)]
    rows = []
    for k, (method, bits) in enumerate(plans, start=1):
        rows.append(row(method, bits))
        progress.report(k, len(plans), "quantized model")  # shown while an explorer renders
    return MixedPrecisionResult(sens, allocation, rows, float(avg_bits))


@dataclass
class GPTQResult:
    """GPTQ against round-to-nearest on the same grids (asymmetric, one per output row) for the
    encoder matrices, everything else float: test accuracy and loss per width, GPTQ's seconds."""

    bits: list[int]
    float_accuracy: float
    rtn_accuracy: list[float]
    gptq_accuracy: list[float]
    rtn_loss: list[float]
    gptq_loss: list[float]
    seconds: list[float]


def gptq_vs_rtn(model: nn.Module, calibration: Mapping[str, Tensor], test: Pair, bits_list: Sequence[int] = (2, 3, 4),
                **options: Any) -> GPTQResult:
    """`hk.quant.gptq(model, calibration, b, layers=encoder_layers(model), **options)` and
    `hesskit.quant.gptq.round_to_nearest` with the same grids, for each b; calibration is a dict batch of
    inputs (no labels)."""
    layers = encoder_layers(model)
    out = GPTQResult(list(bits_list), evaluate(model, test).accuracy, [], [], [], [], [])
    for done, b in enumerate(bits_list, start=1):
        rtn = round_to_nearest(model, b, layers=layers, **{k: v for k, v in options.items()
                                                           if k in ("group_size", "symmetric")})
        start = time.perf_counter()
        quant = gptq(model, calibration, b, layers=layers, **options)
        out.seconds.append(time.perf_counter() - start)
        for q, losses, accs in ((rtn, out.rtn_loss, out.rtn_accuracy), (quant, out.gptq_loss, out.gptq_accuracy)):
            scores = evaluate(q, test)
            losses.append(scores.loss)
            accs.append(scores.accuracy)
        progress.report(done, len(bits_list), "bit width")  # shown while an explorer renders
    return out


# --------------------------------------------------------------------------- continued fine-tuning
OPTIMIZERS = {"adamw": "AdamW", "sophia-g": "Sophia-G"}


def continue_finetuning(task: BertTask, optimizer: str, lr: float, steps: int = 150, batch_size: int = 64,
                        eval_every: int = 25, seed: int = 1, monitor: int = 1024, update_every: int = 10,
                        weight_decay: float = 0.01, gamma: float | None = None, decay: bool = True) -> TrainingRun:
    """Fine-tune a copy of `task.trained.model` for `steps` more steps with AdamW or Sophia-G
    (`hk.optim.Sophia(estimator="gnb", update_every=..., gamma=...)`, whose closure returns (loss,
    outputs) with outputs the Hugging Face ModelOutput: hesskit reads its logits for the
    Gauss-Newton-Bartlett estimate). Train mode (dropout on, masks seeded by `seed`), lr decayed
    linearly to 0 (`decay=False`: constant), batches `batch_order(..., seed)`: the same for every
    optimizer and lr. The training loss on the first `monitor` training sequences (eval mode) and
    the test loss and accuracy are recorded every `eval_every` steps. The steps run through
    `training_steps`: a FloatingPointError (Sophia's closure check) or a non-finite loss stops the
    run as diverged, with a last checkpoint at `steps` of nan values.

    Returns a `training.TrainingRun` named "AdamW" or "Sophia-G": its log holds the minibatch loss
    of every step, `evals` the monitored "train_loss" (what picks the lr, `final_loss`),
    "test_loss" and "test_accuracy" (a fraction) at the checkpoints, `per_step["win_rate"]`
    Sophia's unclipped fraction (nan for AdamW), `extra["steps_returned"]` the steps whose
    optimizer step returned (their seconds: `step_seconds`)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps, eval_every: expected positive integers, got {steps}, {eval_every}")
    inputs, labels = task.trained.train
    order, plan = run_plan(len(labels), steps, batch_size, eval_every, seed)
    model = copy.deepcopy(task.trained.model)
    opt, kind = _optimizer(model, optimizer, lr, weight_decay, update_every, gamma, seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps) if decay else 1.0)
    watch = (select(inputs, slice(0, monitor)), labels[:monitor])
    start = evaluate(model, task.trained.test)
    # checkpoints, monitor loss, test loss, test accuracy
    curves = ([0], [evaluate(model, watch).loss], [start.loss], [start.accuracy])
    win, returned = np.full(steps, np.nan), 0

    def step(t: int) -> Tensor:
        nonlocal returned
        loss = _train_step(model, opt, kind, schedule, task.trained.train, order[t - 1])
        win[t - 1] = getattr(opt, "win_rate", math.nan)
        returned = t  # the steps whose optimizer step returned: the ones timed
        return loss

    def at_checkpoint(t: int) -> None:
        monitor_loss = evaluate(model, watch).loss
        test = evaluate(model, task.trained.test)
        _checkpoint(curves, t, monitor_loss, test.loss, test.accuracy)

    log = _seeded_run(training_steps(step, steps, checkpoints=plan, at_checkpoint=at_checkpoint,
                                     label=f"{OPTIMIZERS[optimizer]} step"), seed)
    if log.diverged:
        _checkpoint(curves, steps, math.nan, math.nan, math.nan)
    checkpoints, monitor_loss, test_loss, test_acc = (np.array(values) for values in curves)
    settings = dict(seed=seed, steps=steps, batch_size=batch_size, eval_every=eval_every, monitor=monitor,
                    weight_decay=weight_decay, decay=decay)
    if optimizer == "sophia-g":
        settings.update(update_every=update_every, gamma=gamma)
    return TrainingRun(optimizer, float(lr), log, checkpoints,
                       {"train_loss": monitor_loss, "test_loss": test_loss, "test_accuracy": test_acc}, settings,
                       per_step={"win_rate": win}, extra={"steps_returned": returned}, name=OPTIMIZERS[optimizer])


def step_seconds(run: TrainingRun) -> float:
    """Seconds of a `continue_finetuning` run's steps whose optimizer step returned (batch,
    optimizer step and lr schedule, as `training_steps` times them; a step that raised excluded)."""
    return float(run.log.seconds[: run.extra["steps_returned"]].sum())


def _optimizer(model: nn.Module, optimizer: str, lr: float, weight_decay: float, update_every: int,
               gamma: float | None, seed: int) -> tuple[torch.optim.Optimizer, str]:
    """`continue_finetuning`'s optimizer over the trainable parameters of `model`, and the kind of
    closure it takes (`make_closure`): AdamW ("backward") or Sophia-G ("loss_outputs")."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "backward"
    opt = Sophia(params, lr=lr, estimator="gnb", update_every=update_every, weight_decay=weight_decay, seed=seed,
                 gamma=gamma)
    return opt, "loss_outputs"


def _checkpoint(curves: tuple[list, list, list, list], step: int, monitor_loss: float, test_loss: float,
                test_accuracy: float) -> None:
    """Append one checkpoint to `continue_finetuning`'s (checkpoints, monitor loss, test loss, test
    accuracy) lists."""
    for values, value in zip(curves, (step, monitor_loss, test_loss, test_accuracy)):
        values.append(value)


def sophia_vs_adamw(task: BertTask, lrs: Mapping[str, Sequence[float]], steps: int = 150, **kwargs: Any
                    ) -> dict[str, list[TrainingRun]]:
    """`continue_finetuning` for every optimizer and lr in `lrs` ({"adamw": [...], "sophia-g": [...]}),
    from the same model on the same batches. `min(runs, key=lambda r: r.final_loss)` picks an lr."""
    return {name: [continue_finetuning(task, name, lr, steps, **kwargs) for lr in values]
            for name, values in lrs.items()}


# --------------------------------------------------------------------------- what the explorer computes
# the explorer's estimators, and the method of hk.trace or hk.diagonal behind each trace or diagonal
TRACE_METHODS = {"XTrace trace": "xtrace", "Hutch++ trace": "hutch++", "Hutchinson trace": "hutchinson"}
DIAGONAL_METHODS = {"GGN diagonal (XDiag)": "xdiag", "GGN diagonal (Hutchinson)": "hutchinson"}
EIGENVALUE = "top eigenvalue (Lanczos)"
ESTIMATORS = (*TRACE_METHODS, EIGENVALUE, *DIAGONAL_METHODS)
# the fewest products each estimator runs with (the core's table, `MIN_MATVECS`); a smaller budget is
# raised to it
MIN_PRODUCTS = {label: MIN_MATVECS[method] for label, method in {**TRACE_METHODS, **DIAGONAL_METHODS}.items()}
MIN_PRODUCTS[EIGENVALUE] = 1


def estimate_block(model: nn.Module, data: Any, params: Sequence[str], estimator: str, num_matvecs: int,
                   seed: int = 0, criterion: nn.Module = CRITERION) -> dict:
    """One estimate for the block of `params`: its Hessian trace (XTrace, Hutch++ or Hutchinson:
    value and standard error), its top eigenvalue (Lanczos with at most `num_matvecs` products;
    error: the residual), or its GGN diagonal (`hk.diagonal` of `hk.GGNOperator` by XDiag or
    Hutchinson; value: the diagonal's sum, i.e. the GGN block's trace, with the entries in
    "entries"). A budget below the estimator's `MIN_PRODUCTS` is raised to it. Also the products
    used and seconds."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    start = time.perf_counter()
    num_matvecs = max(num_matvecs, MIN_PRODUCTS[estimator])
    if estimator in DIAGONAL_METHODS:
        result = diagonal(GGNOperator(model, criterion, data, params=list(params)), num_matvecs, seed=seed,
                          method=DIAGONAL_METHODS[estimator])
        entries = result.value.double().numpy()
        return {"value": float(entries.sum()), "error": math.nan, "entries": entries, "converged": True,
                "num_matvecs": result.num_matvecs, "seconds": time.perf_counter() - start}
    op = HessianOperator(model, criterion, data, params=list(params))
    if estimator.startswith("top"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = eigenvalues(op, k=1, max_matvecs=num_matvecs, basis_size=min(op.shape[0], 40), seed=seed)
        return {"value": float(result.values[0]), "error": float(result.residuals[0]), "entries": None,
                "converged": bool(result.converged[0]), "num_matvecs": result.num_matvecs,
                "seconds": time.perf_counter() - start}
    result = trace(op, num_matvecs, method=TRACE_METHODS[estimator], seed=seed)
    return {"value": result.value, "error": result.stderr, "entries": None, "converged": True,
            "num_matvecs": result.num_matvecs, "seconds": time.perf_counter() - start}


def group_estimates(model: nn.Module, data: Any, modules: Mapping[str, Sequence[str]], estimator: str,
                    products: int, seed: int = 0, criterion: nn.Module = CRITERION) -> dict:
    """`estimate_block` for every module of a block group (`modules`: module name -> its parameter
    names, in model order) with `products` products each, and the convergence of the largest one
    (per parameter; a top eigenvalue as it is): the same estimate again at a quarter and half the
    budget (at least 3 and the estimator's `MIN_PRODUCTS`, below `products`; none for a GGN
    diagonal). Returns {"per": {module: estimate}, "largest",
    "budgets" (the largest one's, ending with `products`), "path" (its estimates at them)}."""
    names, products = list(modules), int(products)
    low = max(3, MIN_PRODUCTS.get(estimator, 1))
    smaller = {max(low, products // 4), max(low, products // 2)}
    budgets = [] if estimator in DIAGONAL_METHODS else sorted(b for b in smaller if b < products)
    # progress, shown while an explorer renders: the budgets of products of every estimate
    total, done = products * len(names) + sum(budgets), 0
    per = {}
    for name in names:
        per[name] = estimate_block(model, data, modules[name], estimator, products, seed, criterion)
        done += products
        progress.report(done, total, "products (budget)")
    params = dict(model.named_parameters())
    sizes = {n: sum(params[p].numel() for p in modules[n]) for n in names}
    largest = max(names, key=lambda n: abs(per[n]["value"]) / (1 if estimator.startswith("top") else sizes[n]))
    path = []
    for b in budgets:  # the largest module again at smaller budgets: how the estimate moves
        path.append(estimate_block(model, data, modules[largest], estimator, b, seed, criterion))
        done += b
        progress.report(done, total, "products (budget)")
    path.append(per[largest])
    return {"per": per, "largest": largest, "budgets": budgets + [products], "path": path}
