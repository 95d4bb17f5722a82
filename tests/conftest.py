"""The model zoo every operator and estimator is checked on, in float64, with ragged batches."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import hesskit as hk  # noqa: E402
from hesskit.experiments.tasks import fit_classifier  # noqa: E402


@dataclass
class Case:
    name: str
    model: nn.Module
    criterion: nn.Module
    batches: list  # list of (x, y), ragged

    @property
    def names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def ragged(x, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


class TiedAutoencoder(nn.Module):
    """Decoder reuses the encoder's weight (transposed): a parameter used twice."""

    def __init__(self, d=5, h=3):
        super().__init__()
        self.enc = nn.Linear(d, h)
        self.dec_bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return torch.tanh(self.enc(x)) @ self.enc.weight + self.dec_bias


class WithUnused(nn.Module):
    """A used layer, a layer never called in forward, and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        return torch.tanh(self.used(x)) * self.frozen


def _seeded(seed):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_case(name: str) -> Case:
    _seeded(0)
    if name == "mlp":
        x, y = hk.data.classification(n=23, dim=4, num_classes=3, seed=1)
        model = hk.models.MLP(4, (5,), 3, activation="tanh")
        return Case(name, model.double(), nn.CrossEntropyLoss(), ragged(x.double(), y, [10, 10, 3]))
    if name == "cnn":
        (x, y), _ = hk.data.digits(seed=0)
        model = hk.models.SmallCNN((2, 3), activation="tanh")
        return Case(name, model.double(), nn.CrossEntropyLoss(), ragged(x[:13].double(), y[:13], [6, 7]))
    if name == "bn_cnn":
        (x, y), _ = hk.data.digits(seed=0)
        model = hk.models.BatchNormCNN((2, 3)).double()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
        return Case(name, model.eval(), nn.CrossEntropyLoss(), ragged(x[:12].double(), y[:12], [7, 5]))
    if name == "layernorm":
        tokens, labels = hk.data.sequences(n=9, length=5, vocab=4, seed=2)
        model = hk.models.TinyTransformer(vocab=4, dim=4, heads=2, mlp_ratio=1).double()
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.3, 0.3)
        return Case(name, model, nn.CrossEntropyLoss(), ragged(tokens, labels, [5, 4]))
    if name == "gelu_mse":
        x, y = hk.data.regression(n=11, dim=3, seed=3)
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 1)).double()
        return Case(name, model, nn.MSELoss(), ragged(x.double(), y.double(), [6, 5]))
    if name == "tied":
        x = torch.randn(10, 5, dtype=torch.float64)
        return Case(name, TiedAutoencoder().double(), nn.MSELoss(), ragged(x, x.clone(), [4, 6]))
    if name == "unused":
        x, y = hk.data.classification(n=10, dim=4, num_classes=3, seed=4)
        return Case(name, WithUnused().double(), nn.CrossEntropyLoss(), ragged(x.double(), y, [3, 7]))
    raise KeyError(name)


CASES = ["mlp", "cnn", "bn_cnn", "layernorm", "gelu_mse", "tied", "unused"]
KINDS = {"hessian": hk.HessianOperator, "ggn": hk.GGNOperator, "empirical_fisher": hk.EmpiricalFisherOperator}


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return make_case(request.param)


def fit(model: nn.Module, x, y, steps: int = 30, lr: float = 0.05) -> nn.Module:
    """A few full-batch Adam steps on cross-entropy (a model near, not at, a minimum); grads cleared:
    `hesskit.experiments.tasks.fit_classifier` with the tests' defaults."""
    return fit_classifier(model, (x, y), steps, lr)


def random_symmetric(n: int, seed: int = 0, decay: float = 0.9, negative: bool = True) -> torch.Tensor:
    """A dense symmetric test matrix with eigenvalues decaying geometrically (some negative)."""
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    eig = 10 * decay ** torch.arange(n, dtype=torch.float64)
    if negative:
        eig[1::3] *= -0.5
    return (Q * eig) @ Q.T


def live_tensors() -> int:
    """How many tensors and parameters are alive now: what a graph or cache kept past its use would grow.
    No collection here: callers collect (or disable the collector) as their check needs."""
    return sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects())


def tensors_around(step, repeats: int) -> tuple[int, int]:
    """(before, after): the live tensors, each counted after a collection, around `repeats` calls of `step()`."""
    gc.collect()
    before = live_tensors()
    for _ in range(repeats):
        step()
    gc.collect()
    return before, live_tensors()


@pytest.fixture
def progress_to(request):
    """`progress_to(fn)`: send every `hesskit.progress.report` of the rest of the test to fn(done, total, what)."""
    from hesskit.progress import sink

    def install(fn):
        context = sink(fn)
        context.__enter__()
        request.addfinalizer(lambda: context.__exit__(None, None, None))

    return install


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest (and time most steadily) on one thread, above all on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
