"""The data problems the notebooks and benchmarks train on, and how a trained model is scored.

- `fit_classifier`: the one loop that trains a classifier to a starting point for a study (Adam or
  AdamW on cross-entropy, full batch or seeded minibatches drawn with replacement): the digits
  MLPs of the compression notebooks, the tiny Fisher problem of notebook 09, the benchmarks'
  trained models and the tests' models near a minimum.
- `digits_mlp`: the flattened-digits MLP every such study starts from, seeded.
- `TrainedModel`: a model trained once and then studied (quantized, pruned, probed) with its data,
  seed, training time, per-step losses (when recorded) and training arguments; `trained_classifier`
  builds one with `fit_classifier`.
- `evaluate` -> `Metrics`: loss and accuracy of a classifier on one batch, in eval mode (the
  model's modes restored), in one unit convention (accuracy as a fraction; `percent` and
  `bits_per_char` convert).
- `Task`: the training problem of an optimizer comparison (notebooks 07, 08, 10 and
  `bench/optimizers.py`): a seeded model factory, training data, a fixed subset on which the training
  loss is measured, test data, the loss and the scoring rule (`evaluate`); `digits_task` (an MLP or a
  `SmallCNN` on the digits) and `char_lm_task` (a `CharTransformerLM` on `hk.data.text`) build one;
  `unigram_entropy` is a character task's context-free baseline loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_count
from .._model import call_model, eval_mode, model_output
from ..data import char_windows, digits, text
from ..models import MLP, CharTransformerLM, SmallCNN

__all__ = ["Metrics", "evaluate", "fit_classifier", "digits_mlp", "FIT_OPTIMIZERS", "TrainedModel",
           "trained_classifier", "Task", "digits_task",
           "char_lm_task", "unigram_entropy"]

FIT_OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True)
class Metrics:
    """What `evaluate` measured: mean `loss` (nan if not finite) and `accuracy` (a fraction)."""

    loss: float
    accuracy: float

    @property
    def percent(self) -> float:
        """Accuracy in percent."""
        return 100.0 * self.accuracy

    @property
    def bits_per_char(self) -> float:
        """The loss in bits (a language model's bits per character)."""
        return self.loss / math.log(2)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[Tensor, Tensor],
             loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, chunk: int | None = None,
             accuracy_dtype: torch.dtype = torch.float64) -> Metrics:
    """`Metrics` of `model` on one (x, y) batch: the mean `loss_fn(outputs, y)` and the fraction of
    argmax predictions that equal y (classes last; sequences are flattened). x may be a tensor
    (`model(x)`) or a dict (`model(**x)`); a Hugging Face ModelOutput's `logits` are scored. The
    model runs in eval mode; every module's mode is restored afterwards. With `chunk`, a tensor x
    runs `chunk` samples at a time (the outputs concatenated): no large temporary tensors, whose
    return to the operating system would make a timed training step after them slower."""
    x, y = data
    with eval_mode(model):
        if chunk is None:
            outputs = model_output(call_model(model, x), None)
        else:
            outputs = torch.cat([model_output(call_model(model, x[i : i + chunk]), None) for i in range(0, len(x), chunk)])
    logits = outputs.flatten(0, -2)
    loss = float(loss_fn(logits, y.flatten()))
    accuracy = float((logits.argmax(-1) == y.flatten()).to(accuracy_dtype).mean())
    return Metrics(loss if math.isfinite(loss) else math.nan, accuracy)


def fit_classifier(model: nn.Module, data: tuple[Tensor, Tensor], steps: int, lr: float, optimizer: str = "adam",
                   batch_size: int | None = None, seed: int = 0) -> nn.Module:
    """Train `model` in place with `steps` steps of `optimizer` ("adam" or "adamw", torch's
    defaults otherwise) on the cross-entropy of `data` = (x, y): full-batch with `batch_size=None`,
    else minibatches of `batch_size` indices drawn with replacement from a generator seeded by
    `seed`. Gradients are cleared at the end (`.grad` None); the model's mode is left as it was.
    Returns the model."""
    check_count("steps", steps, minimum=0)
    check_choice("optimizer", optimizer, FIT_OPTIMIZERS)
    x, y = data
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed) if batch_size is not None else None
    for _ in range(steps):
        if gen is None:
            xb, yb = x, y
        else:
            idx = torch.randint(0, len(y), (batch_size,), generator=gen)
            xb, yb = x[idx], y[idx]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


def digits_mlp(hidden: tuple[int, ...] = (32,), activation: str = "tanh", seed: int = 0,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """`hk.models.MLP(64, hidden, 10, activation)` for the flattened 8 x 8 digits, initialised after
    `torch.manual_seed(seed)` (the global generator is reseeded: the studies rely on it)."""
    torch.manual_seed(seed)
    return MLP(64, tuple(hidden), 10, activation=activation).to(dtype)


# --------------------------------------------------------------------------- a model trained once, then studied
@dataclass
class TrainedModel:
    """A model trained once and then studied (quantized, pruned, probed), with its data.

    `train` and `test` are (x, y) (x a tensor, or a dict of tensors for a Hugging Face model);
    `seed` seeded the model and the data split; `train_seconds` is the training wall time (nan if
    not measured); `losses` the per-step training losses (None if not recorded); `config` the
    training arguments (steps, lr, optimizer, ...); `test_metrics` the trained model's `Metrics` on
    `test`, when the trainer measured them (None otherwise)."""

    model: nn.Module
    train: tuple[Any, Tensor]
    test: tuple[Any, Tensor]
    seed: int = 0
    train_seconds: float = math.nan
    losses: list[float] | None = field(default=None, repr=False)
    config: dict[str, Any] = field(default_factory=dict)
    test_metrics: Metrics | None = None

    def calibration(self, num_samples: int) -> Any:
        """The first `num_samples` training inputs (no labels: calibration needs none; the split is a
        seeded permutation, so they are a random sample)."""
        x = self.train[0]
        size = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
        if num_samples > size:
            raise ValueError(f"num_samples: expected at most {size} (the training set), got {num_samples}")
        if isinstance(x, dict):
            return {k: v[:num_samples] for k, v in x.items()}
        return x[:num_samples]


def trained_classifier(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], steps: int,
                       lr: float, optimizer: str = "adam", batch_size: int | None = None, seed: int = 0,
                       **config: Any) -> TrainedModel:
    """`fit_classifier(model, train, steps, lr, optimizer, batch_size, seed)`, timed, as a
    `TrainedModel` with the model in eval mode; `config` holds the training arguments plus any
    extra `config` entries (e.g. the architecture)."""
    start = time.perf_counter()
    fit_classifier(model, train, steps, lr, optimizer=optimizer, batch_size=batch_size, seed=seed)
    seconds = time.perf_counter() - start
    config = dict(config, steps=steps, lr=lr, optimizer=optimizer, batch_size=batch_size)
    return TrainedModel(model.eval(), train, test, seed, seconds, None, config)


# --------------------------------------------------------------------------- the optimizer comparisons' tasks
@dataclass
class Task:
    """A training problem for an optimizer comparison: a model factory, training data, a fixed
    "training loss" subset, test data, and how a model is scored.

    Models and data live on `device`, the training data's (`to` moves a task). `metric`:
    "accuracy" (%, higher is better) or "bits/char" (lower is better). `train_eval` (None: all of
    `train`) is where the training loss is measured. `vocab`: a character task's characters (id i
    is `vocab[i]`; "" otherwise). `accuracy_dtype`: the dtype in which `evaluate` takes the fraction
    of correct answers (bench/optimizers.py's records count in float32)."""

    name: str
    make_model: Callable[[], nn.Module]
    train: tuple[Tensor, Tensor]  # minibatches are drawn from here
    test: tuple[Tensor, Tensor]
    metric: str = "accuracy"
    train_eval: tuple[Tensor, Tensor] | None = None  # the training loss is measured here
    vocab: str = ""
    accuracy_dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        check_choice("metric", self.metric, ("accuracy", "bits/char"))
        if self.train_eval is None:
            self.train_eval = self.train

    @property
    def device(self) -> torch.device:
        return self.train[0].device

    def to(self, device: torch.device | str) -> Task:
        """The same task with its data on `device` (and its models made there)."""
        def move(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return tuple(t.to(device) for t in pair)

        return replace(self, train=move(self.train), train_eval=move(self.train_eval), test=move(self.test))

    def model(self, seed: int = 0) -> nn.Module:
        """A fresh model after `torch.manual_seed(seed)`: the same weights for every optimizer."""
        torch.manual_seed(seed)
        return self.make_model().to(self.device)

    @staticmethod
    def loss(outputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy, the flattened logits it was computed from): what the `compute` of
        `hesskit.optim.make_closure` returns."""
        logits = outputs.flatten(0, -2)
        return F.cross_entropy(logits, y.flatten()), logits

    def evaluate(self, model: nn.Module, data: tuple[Tensor, Tensor], chunk: int | None = None) -> Metrics:
        """`Metrics` of `model` on `data` by `evaluate` (accuracy counted in `accuracy_dtype`;
        `chunk`: samples per forward pass)."""
        return evaluate(model, data, chunk=chunk, accuracy_dtype=self.accuracy_dtype)

    def score(self, model: nn.Module, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
        """(mean cross-entropy, the task's metric): accuracy in % or bits per character."""
        m = self.evaluate(model, data)
        return m.loss, m.percent if self.metric == "accuracy" else m.bits_per_char

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def num_params(self) -> int:
        """The model's number of parameters (builds `model(0)`: the global generator is reseeded)."""
        return sum(p.numel() for p in self.model(0).parameters())


def digits_task(architecture: str = "cnn", hidden: tuple[int, ...] = (64,), channels: tuple[int, int] = (4, 8),
                eval_size: int | None = None, seed: int = 0) -> Task:
    """The 8 x 8 digits (`hk.data.digits`, 20% held out by a split seeded by `seed`: 1,438
    training and 359 test images) for `architecture` "cnn" (`SmallCNN(channels)`, tanh, 2x2
    max-pool; (4, 8) channels: 666 parameters) or "mlp" (`MLP(64, hidden, 10)`, tanh, on the
    flattened images). The training loss is measured on the first `eval_size` training images
    (None: all of them)."""
    check_choice("architecture", architecture, ("mlp", "cnn"))
    (x, y), (x_test, y_test) = digits(flatten=architecture == "mlp", seed=seed)
    sub = slice(None) if eval_size is None else slice(0, eval_size)
    if architecture == "cnn":
        c = tuple(channels)
        name, make = f"digits, SmallCNN{c}", lambda: SmallCNN(c)
    else:
        h = tuple(hidden)
        name, make = f"digits, MLP{h}", lambda: MLP(64, h, 10, activation="tanh")
    return Task(name, make, (x, y), (x_test, y_test), "accuracy", (x[sub], y[sub]))


def char_lm_task(num_chars: int = 20_000, length: int = 32, dim: int = 16, blocks: int = 1, heads: int = 2,
                 mlp_ratio: int = 2, stride: int | None = None, eval_windows: int | None = 128,
                 seed: int = 0) -> Task:
    """Next-character prediction on `hk.data.text(num_chars, seed)` (26 characters), windows of
    `length` starting `stride` characters apart (None: `length`, no overlap), the last 10% held
    out, with a `CharTransformerLM` of the given shape; the metric is bits per character. The
    training loss is measured on the first `eval_windows` training windows (None: all)."""
    (x, y), (x_test, y_test), vocab = char_windows(text(num_chars, seed=seed), length, test_fraction=0.1,
                                                   stride=stride)
    size = dict(dim=dim, blocks=blocks, heads=heads, mlp_ratio=mlp_ratio)
    sub = slice(None) if eval_windows is None else slice(0, eval_windows)
    return Task(f"char LM, {blocks} block(s) of width {dim}",
                lambda: CharTransformerLM(len(vocab), max_length=length, **size),
                (x, y), (x_test, y_test), "bits/char", (x[sub], y[sub]), vocab)


def unigram_entropy(task: Task) -> float:
    """Entropy (nats) of a character task's training targets' frequencies: the loss of the best
    model that ignores context."""
    counts = torch.bincount(task.train[1].reshape(-1), minlength=len(task.vocab)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
