"""One contract table over all of hesskit's optimizers (as torch's `optim_db` in
`torch/testing/_internal/common_optimizers.py`), and the generic tests run over every entry.

`OPTIMIZERS` lists, per optimizer, a factory `make(model, params, **kwargs)`, the settings to run
(`OptimizerInput`: the first are the defaults or a problem-suited lr, the others representative
non-default settings, each with the closure kind it needs) and flags for what it supports. A new
optimizer gets the whole contract by adding an entry. The per-optimizer files keep what is specific
to a paper: first steps by hand, trajectories against the equations, convergence, hyperparameter errors.

The problem: a tiny CNN (Conv2d, BatchNorm2d in train mode, Tanh, Dropout in eval mode, Linear; the
BatchNorm is a fallback layer for K-FAC and MKOR) on 64 samples of 10 Gaussian blobs shaped as 8x8 images.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesskit as hk
from hesskit.optim import make_closure

pytestmark = pytest.mark.filterwarnings("ignore:.*fallback step:UserWarning")  # K-FAC/MKOR: the BatchNorm


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class OptimizerInput:
    """One setting to run: keyword arguments for `OptimizerInfo.make` and the closure it needs."""

    desc: str
    kwargs: dict
    closure: str = "loss"  # hk.optim.make_closure kind: "loss" or "loss_outputs"
    random: bool = False  # draws probes or labels from its `seed` (so another seed gives other steps)
    adapts: tuple[str, ...] = ()  # optimizer-wide settings the run changes (kept in state_dict)
    halves_in: int = 10  # full-batch steps within which the loss falls below half


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    make: Callable[..., torch.optim.Optimizer]  # make(model, params, **kwargs)
    inputs: tuple[OptimizerInput, ...]
    no_closure_error: str  # regex of the TypeError raised by `opt.step()` without a closure
    takes_model: bool = False  # the model is the first argument (layer hooks): KFAC, MKOR
    seeded: bool = False  # a `seed` argument, saved in state_dict
    process_group: bool = False  # a `process_group` argument (torch.distributed)
    step_after_backward: bool = False  # `step()` without a closure after the caller's loss.backward()
    lazy_trainable: bool = False  # reads requires_grad at every step: a parameter may be frozen after construction
    marks: dict = field(default_factory=dict)  # test name -> pytest marks (known bugs), as torch's DecorateInfo
    cls: type = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "cls", getattr(hk.optim, self.name))




def _closure_error(name: str) -> str:
    return rf"closure: {name}\.step needs closure\(\) that zeroes the gradients .* without calling backward"


OPTIMIZERS = (
    OptimizerInfo(
        "AdaHessian", lambda model, params, **kw: hk.optim.AdaHessian(params, **kw),
        inputs=(
            OptimizerInput("default", {}, random=True),
            OptimizerInput("update_every2", dict(lr=0.05, update_every=2), random=True),
            OptimizerInput("power0.5-gaussian-2probes-wd-noavg", dict(
                hessian_power=0.5, distribution="gaussian", num_probes=2, weight_decay=1e-3, spatial_average=False),
                random=True),
        ),
        no_closure_error=_closure_error("AdaHessian"), seeded=True, process_group=True, lazy_trainable=True),
    OptimizerInfo(
        "Sophia", lambda model, params, **kw: hk.optim.Sophia(params, **kw),
        inputs=(
            OptimizerInput("H-update_every3", dict(lr=0.01, update_every=3), random=True, halves_in=20),
            OptimizerInput("G-update_every3", dict(lr=0.01, update_every=3, estimator="gnb"), "loss_outputs",
                           random=True, halves_in=20),
            OptimizerInput("H-official-rademacher", dict(lr=0.02, update_every=1, bias_correction=False,
                                                         distribution="rademacher"), random=True),
        ),
        no_closure_error=_closure_error("Sophia"), seeded=True, process_group=True, lazy_trainable=True),
    OptimizerInfo(
        "KFAC", lambda model, params, **kw: hk.optim.KFAC(model, params=params, **kw),
        inputs=(
            OptimizerInput("default", {}),
            OptimizerInput("factor_every2-inverse_every3-wd", dict(lr=0.05, weight_decay=1e-3, factor_every=2,
                                                                   inverse_every=3)),
            OptimizerInput("factor_every2-inverse_every4", dict(lr=0.05, factor_every=2, inverse_every=4)),
            OptimizerInput("mc", dict(lr=0.05, factor_every=2, inverse_every=3, fisher="mc", seed=3), "loss_outputs",
                           random=True),
            OptimizerInput("no_kl_clip-every_step", dict(lr=0.05, kl_clip=None, factor_every=1, inverse_every=1)),
        ),
        no_closure_error=r"closure: KFAC\.step needs closure\(\) .*step\(\) after your own loss\.backward\(\) is not "
                         "supported", takes_model=True, seeded=True),
    OptimizerInfo(
        "MKOR", lambda model, params, **kw: hk.optim.MKOR(model, params=params, **kw),
        inputs=(
            OptimizerInput("default", {}, halves_in=15),
            OptimizerInput("lr0.05", dict(lr=0.05), halves_in=15),
            OptimizerInput("inverse_every2-stabilised", dict(lr=0.05, inverse_every=2, stabilization_threshold=1.01),
                           halves_in=15),
            OptimizerInput("mc", dict(fisher="mc"), "loss_outputs", random=True, halves_in=15),
        ),
        no_closure_error=r"closure: MKOR\.step needs closure\(\) .*step\(\) after your own loss\.backward\(\) is not "
                         "supported", takes_model=True, seeded=True),
    OptimizerInfo(
        "MFAC", lambda model, params, **kw: hk.optim.MFAC(params, **kw),
        inputs=(
            OptimizerInput("m8", dict(lr=0.05, num_grads=8, damping=1e-2), halves_in=20),
            OptimizerInput("m3-wrapped-momentum-wd", dict(lr=0.05, num_grads=3, damping=1e-2, momentum=0.9,
                                                          weight_decay=1e-3), halves_in=25),
        ),
        no_closure_error=r"closure: MFAC\.step\(\) without a closure needs gradients in \.grad \(call "
                         r"loss\.backward\(\) first\), or pass closure\(\)",
        process_group=True, step_after_backward=True),
    OptimizerInfo(
        "NewtonCG", lambda model, params, **kw: hk.optim.NewtonCG(params, **kw),
        inputs=(
            OptimizerInput("ggn-cg8", dict(damping=1.0, max_cg_iters=8), "loss_outputs", adapts=("damping",),
                           halves_in=4),
            OptimizerInput("hessian-cg4", dict(curvature="hessian", max_cg_iters=4), adapts=("damping",),
                           halves_in=4),
            OptimizerInput("ggn-fixed_damping-cg4", dict(lr=0.5, damping=0.1, adapt_damping=False, max_cg_iters=4),
                           "loss_outputs", halves_in=4),
        ),
        no_closure_error=_closure_error("NewtonCG"), lazy_trainable=True),
    OptimizerInfo(
        "RegularizedNewton", lambda model, params, **kw: hk.optim.RegularizedNewton(params, **kw),
        inputs=(
            OptimizerInput("default-hessian-cg", {}, adapts=("gamma",)),
            OptimizerInput("ggn-cholesky", dict(curvature="ggn", solver="cholesky"), "loss_outputs", adapts=("gamma",)),
            OptimizerInput("fisher-cg10", dict(curvature="fisher", max_cg_iters=10), "loss_outputs", adapts=("gamma",)),
        ),
        no_closure_error=_closure_error("RegularizedNewton"), lazy_trainable=True),
)


def infos(test: str) -> list:
    """Every entry, with the marks it lists for `test`."""
    return [pytest.param(info, id=info.name, marks=info.marks.get(test, ())) for info in OPTIMIZERS]


def cases(test: str) -> list:
    """Every (entry, setting), with the marks the entry lists for `test`."""
    return [pytest.param(info, inp, id=f"{info.name}-{inp.desc}", marks=info.marks.get(test, ()))
            for info in OPTIMIZERS for inp in info.inputs]


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


# ------------------------------------------------------------------ the problem
X, Y = hk.data.classification(n=64, dim=64, num_classes=10, seed=0)  # fixed generator
X = X.reshape(64, 1, 8, 8)


def batches(dtype: torch.dtype, count: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 64 samples as `count` batches."""
    return list(zip(X.to(dtype).chunk(count), Y.chunk(count)))


def net(dtype: torch.dtype) -> nn.Sequential:
    """Root in train mode, Dropout in eval mode (steps stay deterministic, and Newton-CG's second
    closure call evaluates the same function)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(18, 10)).to(dtype)
    model[4].eval()
    return model


def lr_of(info: OptimizerInfo, inp: OptimizerInput) -> float:
    return inp.kwargs.get("lr", inspect.signature(info.cls).parameters["lr"].default)


def two_groups(model: nn.Module, lr: float) -> list[dict]:
    """The first layer (weight and bias) in a group of its own with `lr`; the rest at the optimizer's lr."""
    first = list(model[0].parameters())
    return [{"params": first, "lr": lr}, {"params": [p for p in model.parameters() if all(p is not q for q in first)]}]


def build(info: OptimizerInfo, inp: OptimizerInput, model: nn.Module, params=None, **overrides):
    return info.make(model, list(model.parameters()) if params is None else params, **{**inp.kwargs, **overrides})


def closure(inp: OptimizerInput, opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: list | None = None,
            kind: str | None = None):
    def compute():
        out = model(x)
        loss = F.cross_entropy(out, y)
        if calls is not None:
            calls.append(loss)
        return loss, out

    return make_closure(kind or inp.closure, opt, compute)


def train(inp, opt, model, data, steps: int, start: int = 0) -> list[torch.Tensor]:
    """`steps` steps, step i on data[i % len(data)]; the losses `step` returned."""
    return [opt.step(closure(inp, opt, model, *data[i % len(data)])) for i in range(start, start + steps)]


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b, where: str = "state_dict") -> None:
    """Bit-identical nested state: tensors equal with the same dtype, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (where, a, b)


def assert_dtype(opt, model: nn.Module, dtype: torch.dtype, state: bool = True) -> None:
    """Parameters, gradients (detached) and every state tensor but scalar counters in `dtype`; `state`:
    there is such a tensor (Newton-CG drops its warm start after a rejected step)."""
    assert all(p.dtype == dtype for p in model.parameters())
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == dtype and p.grad.grad_fn is None
    tensors = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    assert (tensors or not state) and all(t.dtype == dtype for t in tensors)


def hooks(model: nn.Module) -> list:
    return [h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                                  m._backward_pre_hooks) if h]


# ------------------------------------------------------------------ the contract
@pytest.mark.parametrize("info", infos("test_table_matches_the_optimizers"))
def test_table_matches_the_optimizers(info):
    signature = inspect.signature(info.cls).parameters
    assert (next(iter(signature)) == "model") == info.takes_model
    assert ("seed" in signature) == info.seeded == ("seed" in info.cls.settings)
    assert ("process_group" in signature) == info.process_group
    for inp in info.inputs:
        opt = build(info, inp, net(torch.float64), **({"process_group": None} if info.process_group else {}))
        assert opt.needs_outputs == (inp.closure == "loss_outputs"), inp.desc
        assert not inp.random or info.seeded
        assert all(k in info.cls.settings for k in inp.adapts)
    assert all(callable(globals().get(test)) for test in info.marks)  # marks name tests of this file


@DTYPES
@pytest.mark.parametrize("info, inp", cases("test_state_dict_round_trip_continues_bit_identically"))
def test_state_dict_round_trip_continues_bit_identically(info, inp, dtype):
    """Two param groups (lrs 0.4:1), a different batch every step, torch.save in between: a fresh
    model and optimizer loaded after 4 steps continue the next 4 (across refreshes of every
    setting's curvature but MKOR's default inverse_every=10) with the same losses, parameters,
    buffers and optimizer state."""
    data = batches(dtype, 4)
    model = net(dtype)
    opt = build(info, inp, model, two_groups(model, 0.4 * lr_of(info, inp)))
    losses = train(inp, opt, model, data, 4)
    saved_model, buffer = copy.deepcopy(model.state_dict()), io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    losses += train(inp, opt, model, data, 4, start=4)

    twin = net(dtype)
    twin.load_state_dict(saved_model)
    twin_opt = build(info, inp, twin, two_groups(twin, 0.4 * lr_of(info, inp)))
    built = {k: getattr(twin_opt, k) for k in inp.adapts}
    buffer.seek(0)
    saved = torch.load(buffer)
    twin_opt.load_state_dict(saved)
    assert_same(twin_opt.state_dict(), saved)  # everything restored, settings included
    for k in inp.adapts:  # the run changed them, and they were restored
        assert getattr(twin_opt, k) == saved["hesskit"][k] != built[k], k
    twin_losses = train(inp, twin_opt, twin, data, 4, start=4)
    assert all(torch.equal(a, b) for a, b in zip(losses[4:], twin_losses))
    assert_same(twin.state_dict(), model.state_dict(), "model")
    assert_same(twin_opt.state_dict(), opt.state_dict())
    assert_dtype(twin_opt, twin, dtype)


@DTYPES
@pytest.mark.parametrize("info, inp", cases("test_steps_keep_the_dtype_and_lower_the_loss"))
def test_steps_keep_the_dtype_and_lower_the_loss(info, inp, dtype):
    data = batches(dtype)
    model = net(dtype)
    opt = build(info, inp, model)
    x, y = data[0]
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    losses = train(inp, opt, model, data, inp.halves_in)
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
    assert all(loss.dtype == dtype for loss in losses)
    assert last < 0.5 * first, (first, last)
    assert_dtype(opt, model, dtype)


@DTYPES
@pytest.mark.parametrize("info, inp", cases("test_the_model_is_left_alone_apart_from_its_parameters"))
def test_the_model_is_left_alone_apart_from_its_parameters(info, inp, dtype):
    """Mixed modes (root eval, BatchNorm train), a frozen bias in the optimizer's groups (frozen after
    construction where the optimizer allows it), two groups: after 3 steps the modes and flags are
    as they were, no hook is left, the buffers are what the last closure's forward made them (one
    BatchNorm update per closure call, no other forward), the frozen bias has not moved."""
    model = net(dtype)
    model.eval()
    model[1].train()
    modes = [m.training for m in model.modules()]
    frozen = model[0].bias
    if not info.lazy_trainable:
        frozen.requires_grad_(False)
    opt = build(info, inp, model, two_groups(model, 0.01))
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = frozen.detach().clone()
    calls, seen = [], []
    x, y = batches(dtype)[0]

    def snapshot():
        out = model(x)
        seen.append({k: b.clone() for k, b in model.named_buffers()})
        loss = F.cross_entropy(out, y)
        calls.append(loss)
        return loss, out

    losses = [opt.step(make_closure(inp.closure, opt, snapshot)).item() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not hooks(model)
    assert int(model[1].num_batches_tracked) == len(calls) >= 3
    assert_same(dict(model.named_buffers()), seen[-1], "buffers")
    assert torch.equal(frozen, before) and frozen.grad is None
    assert_dtype(opt, model, dtype, state=False)


@pytest.mark.parametrize("info", infos("test_freezing_a_parameter_after_construction"))
def test_freezing_a_parameter_after_construction(info):
    """Optimizers that read requires_grad at every step leave the newly frozen parameter alone; the
    others lay out their state at construction and must refuse clearly."""
    model = net(torch.float64)
    inp = info.inputs[0]
    opt = build(info, inp, model)
    model[0].bias.requires_grad_(False)
    before = model[0].bias.detach().clone()
    if info.lazy_trainable:
        train(inp, opt, model, batches(torch.float64), 2)
        assert torch.equal(model[0].bias, before)
    else:
        with pytest.raises(ValueError, match="requires_grad"):
            train(inp, opt, model, batches(torch.float64), 1)


@pytest.mark.parametrize("info, inp", cases("test_a_param_group_with_lr_zero_does_not_move"))
def test_a_param_group_with_lr_zero_does_not_move(info, inp):
    model = net(torch.float64)
    opt = build(info, inp, model, two_groups(model, 0.0))
    start = params_of(model)
    train(inp, opt, model, batches(torch.float64), 2)
    after = list(model.parameters())
    assert torch.equal(after[0], start[0]) and torch.equal(after[1], start[1])  # model[0], lr 0
    assert all(not torch.equal(p, s) for p, s in zip(after[2:], start[2:]))


@pytest.mark.parametrize("info, inp", cases("test_misuse_gets_clear_errors_and_changes_nothing"))
def test_misuse_gets_clear_errors_and_changes_nothing(info, inp):
    model = net(torch.float64)
    opt = build(info, inp, model)
    x, y = batches(torch.float64)[0]
    start = params_of(model)
    outputs = inp.closure == "loss_outputs"

    def with_backward():  # the torch.optim habit
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return (loss, out) if outputs else loss

    with pytest.raises(TypeError, match=info.no_closure_error):
        opt.step()
    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(with_backward)
    if outputs:
        with pytest.raises(ValueError, match=rf"closure: {info.name} needs closure\(\) to return \(loss, outputs\)"):
            opt.step(closure(inp, opt, model, x, y, kind="loss"))

    def bad(transform):
        def fn():
            out = model(x)
            loss = transform(F.cross_entropy(out, y, reduction="none"))
            return (loss, out) if outputs else loss
        return fn

    with pytest.raises(ValueError, match="closure: expected a scalar loss tensor"):
        opt.step(bad(lambda losses: losses))
    with pytest.raises(ValueError, match="closure: the loss has no graph"):
        opt.step(bad(lambda losses: losses.mean().detach()))
    with pytest.raises(FloatingPointError, match="diverged"):
        opt.step(bad(lambda losses: losses.mean() * float("nan")))
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert not hooks(model)


@pytest.mark.parametrize("info, inp", cases("test_step_after_the_callers_own_backward"))
def test_step_after_the_callers_own_backward(info, inp):
    """Supported (the same step as with the closure, no loss returned) or refused without moving."""
    x, y = batches(torch.float64)[0]
    model, twin = net(torch.float64), net(torch.float64)
    opt, twin_opt = build(info, inp, model), build(info, inp, twin)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    start = params_of(model)
    if not info.step_after_backward:
        with pytest.raises(TypeError, match=info.no_closure_error):
            opt.step()
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
        return
    assert opt.step() is None
    twin_opt.step(closure(inp, twin_opt, twin, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("info, inp", cases("test_same_seed_same_run_whatever_the_global_rng"))
def test_same_seed_same_run_whatever_the_global_rng(info, inp):
    """Randomness comes from the optimizer's own seed, never torch's global generator."""

    def run(global_seed: int, **overrides):
        model = net(torch.float64)
        opt = build(info, inp, model, **overrides)
        torch.manual_seed(global_seed)
        train(inp, opt, model, batches(torch.float64, 2), 4)
        return params_of(model)

    first = run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, run(2)))
    if info.seeded:  # another seed: other probes or labels, if the setting draws any
        other = run(1, seed=inp.kwargs.get("seed", 0) + 1)
        assert all(torch.equal(a, b) for a, b in zip(first, other)) == (not inp.random)


@pytest.mark.parametrize("info, inp", cases("test_step_returns_the_closures_loss"))
def test_step_returns_the_closures_loss(info, inp):
    """The loss of the closure call that was differentiated (the first of the step), detached."""
    model = net(torch.float64)
    opt = build(info, inp, model)
    data = batches(torch.float64, 2)
    for i in range(2):
        calls = []
        loss = opt.step(closure(inp, opt, model, *data[i], calls=calls))
        assert torch.equal(loss, calls[0].detach()) and not loss.requires_grad
