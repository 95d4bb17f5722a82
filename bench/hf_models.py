"""Transformers benchmark: Hessian and GGN products on Hugging Face models, hesskit against PyHessian 0.1
and hessian-eigenthings 1.0.0a5, one run.

    python bench/hf_models.py            # the README tables (about 8 minutes on 2 CPU cores)
    python bench/hf_models.py --quick    # tiny configs, checks that the script runs

Models, built from configs with random weights (nothing is downloaded), float32, eval mode, the
default `attn_implementation="sdpa"`, batch 8 of sequence length 128 (random token ids):
a GPT-2-style causal LM (GPT2LMHeadModel: vocab 8192, n_embd 256, 10 layers, 4 heads, tied LM
head; 10,028,032 parameters) with the shifted token cross-entropy (`hk.SequenceCrossEntropy(shift=True)`),
and a BERT classifier (BertForSequenceClassification: vocab 8192, hidden 256, 4 layers, 4 heads,
intermediate 1024, 2 labels; 5,356,290 parameters) with `nn.CrossEntropyLoss`.

What is measured, per model:

1. Time: median wall time of one call, all candidates taking turns (`timed_interleaved` from
   bench/curvature.py, after one warm-up call each, which also builds the cached graphs), as a
   multiple of one gradient (forward + backward with plain autograd, default SDPA kernel). Rows:
   hesskit's Hessian-vector and GGN-vector products with the batch's graph reused (the product
   alone) and rebuilt (`cache_memory=0`: forward + create_graph backward + product); PyHessian's
   product on its kept graph (`pyhessian.utils.hessian_vector_product(gradsH, params, v)`, what
   `hessian.eigenvalues()` and `hessian.trace()` call once per iteration on a single batch) and its
   `dataloader_hv_product` (the multi-batch path, which rebuilds the graph per product);
   hessian-eigenthings' `HessianOperator.matvec` (1.0.0a5 has no HVPOperator; its autograd
   `matvec` rebuilds the graph per product). A gradient on the math SDPA kernel is also timed:
   the double-backward passes need that kernel, so it is part of every rebuilt product.
2. Memory: each configuration runs in a fresh child process (`--child`), with glibc's
   `MALLOC_MMAP_THRESHOLD_=131072` so that freed tensors go back to the OS and the resident set
   follows what is live. Peak = the process's peak resident set (Linux VmHWM, reset through
   /proc/self/clear_refs just before; where that reset is refused, `ru_maxrss`) minus the resident
   set just before the call, with the model and batch already built (each configuration first
   runs once on the tiny model, so that the code it needs is paged in and not counted). "First"
   is the first product (for a cached graph: building it, plus the product; for PyHessian's kept
   graph: its constructor, which deep-copies the model, plus one product); "held" is the
   resident-set growth left after it, i.e. the graph kept between products; "later" is the peak
   of one more product above that. torch has no CPU allocator statistics, so the resident set is
   the measure.
3. Profile (GPT-2): torch.profiler (CPU) on a gradient and a reused hesskit HVP: the top aten
   operators by self CPU time, the time in matrix products against everything else, and the
   HVP's time by autograd node. One cheap idea is measured (timed in the same interleaved loop
   and profiled): the same GPT-2 with `activation_function="gelu_pytorch_tanh"`, one fused GELU
   op instead of GPT-2's default `gelu_new`, a Python-level tanh formula of seven elementwise ops
   (the same function to float32 rounding).

The competitors need their model calls adapted:
* PyHessian calls `model(x)` with one tensor and `criterion(outputs, targets)`, and expects a
  tensor out, so it gets a small wrapper module (`LogitsOnly`): input_ids in, logits out (for the
  causal LM the shifted logits flattened to (B*(T-1), V), against the shifted ids flattened, so
  `nn.CrossEntropyLoss` gives the same loss). Its create_graph backward runs inside
  `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)` (without it the product fails: "derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the script falls back to `attn_implementation="eager"` if that fails and says so.
* hessian-eigenthings takes `loss_fn(model, batch)`; it gets `criterion(model(**inputs).logits,
  targets)` and runs its `matvec` inside the same math-kernel context (same fallback).
Each product is checked against hesskit's on the same vector (relative difference printed).

The machine is shared: other processes' load slows the many small multithreaded elementwise ops
of a double backward far more than the large matrix products of a gradient, so ratios grow with
load. The script prints the load average at its start and end.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import hesskit as hk  # noqa: E402
from _rss import settle_kb, status_kb  # noqa: E402  (bench/ is the script's directory)


def _load_curvature():
    spec = importlib.util.spec_from_file_location("bench_curvature", HERE / "curvature.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


timed_interleaved = _load_curvature().timed_interleaved

THREADS = 2
CHILD_CONFIGS = ["gradient", "hk_hvp_reused", "hk_hvp_rebuilt", "hk_ggn_reused", "hk_ggn_rebuilt",
                 "pyhessian_kept", "pyhessian_rebuilt", "eigenthings"]


# ------------------------------------------------------------------ models and data
@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: dict
    targets: torch.Tensor
    criterion: nn.Module
    shift: bool  # causal LM: logits at t score token t + 1

    @property
    def data(self):
        return (self.inputs, self.targets)  # one batch: inputs a dict, so hesskit calls model(**inputs)

    @property
    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, model=None):
        return self.criterion((model or self.model)(**self.inputs).logits, self.targets)


def build(name: str, quick: bool, attn: str = "sdpa", activation: str | None = None) -> Case:
    """The benchmark's model and batch, identical in every process (fixed seeds)."""
    import transformers

    transformers.logging.set_verbosity_error()
    batch, seq = (4, 16) if quick else (8, 128)
    vocab = 256 if quick else 8192
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if name == "gpt2":
        extra = {"activation_function": activation} if activation else {}
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=seq, n_embd=32 if quick else 256, n_layer=2 if quick else 10,
            n_head=2 if quick else 4, bos_token_id=0, eos_token_id=0, use_cache=False,
            attn_implementation=attn, **extra)
        model = transformers.GPT2LMHeadModel(config).eval()
        return Case("GPT-2", model, {"input_ids": ids}, ids, hk.SequenceCrossEntropy(shift=True), True)
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32 if quick else 256, num_hidden_layers=1 if quick else 4,
        num_attention_heads=2 if quick else 4, intermediate_size=128 if quick else 1024,
        max_position_embeddings=seq, num_labels=2, attn_implementation=attn)
    model = transformers.BertForSequenceClassification(config).eval()
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return Case("BERT", model, {"input_ids": ids}, labels, nn.CrossEntropyLoss(), False)


class LogitsOnly(nn.Module):
    """What PyHessian can call: `model(input_ids) -> logits tensor`; a causal LM's logits come shifted
    and flattened to (B*(T-1), V), so that nn.CrossEntropyLoss against the shifted ids is its loss."""

    def __init__(self, model: nn.Module, shift: bool):
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, input_ids):
        logits = self.model(input_ids=input_ids).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1]) if self.shift else logits


def pyhessian_data(case: Case):
    x = case.inputs["input_ids"]
    y = x[:, 1:].reshape(-1) if case.shift else case.targets
    return x, y


def math_kernel():
    return sdpa_kernel(SDPBackend.MATH)


# ------------------------------------------------------------------ competitors
class PyHessianRunner:
    """PyHessian 0.1 on a deep copy of the model (its constructor leaves create_graph gradients in .grad)."""

    def __init__(self, case: Case, quick: bool, kept: bool = True, rebuilt: bool = True):
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        self.hvp = hessian_vector_product
        self.attention = "math SDPA kernel (sdpa_kernel(SDPBackend.MATH))"
        self.context = math_kernel
        model = case.model
        try:
            self._setup(hessian, model, case, kept, rebuilt)
            self.product_kept() if kept else self.product_rebuilt()
        except RuntimeError as exc:  # no double backward: fall back to eager attention
            self.attention = f"eager attention (math kernel failed: {str(exc).splitlines()[0][:80]})"
            self.context = nullcontext
            eager = build("gpt2" if case.shift else "bert", quick, attn="eager")
            self._setup(hessian, eager.model, case, kept, rebuilt)

    def _setup(self, hessian, model, case, kept, rebuilt):
        wrapped = LogitsOnly(copy.deepcopy(model), case.shift)
        data = pyhessian_data(case)
        criterion = nn.CrossEntropyLoss()
        with warnings.catch_warnings(), self.context():
            warnings.simplefilter("ignore")  # backward(create_graph=True) warns of the .grad reference cycle
            self.kept = hessian(wrapped, criterion, data=data, cuda=False) if kept else None
            self.loader = hessian(wrapped, criterion, dataloader=[data], cuda=False) if rebuilt else None
        params = (self.kept or self.loader).params
        self.sizes = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]

    def split(self, v):
        return [t.reshape(s) for t, s in zip(v.split(self.sizes), self.shapes)]

    def product_kept(self, v=None):
        vs = self.split(v if v is not None else torch.randn(sum(self.sizes)))
        with self.context():
            return torch.cat([t.reshape(-1) for t in self.hvp(self.kept.gradsH, self.kept.params, vs)])

    def product_rebuilt(self, v=None):
        vs = self.split(v if v is not None else torch.randn(sum(self.sizes)))
        with warnings.catch_warnings(), self.context():
            warnings.simplefilter("ignore")
            _, hv = self.loader.dataloader_hv_product(vs)
        return torch.cat([t.reshape(-1) for t in hv])


class EigenthingsRunner:
    """hessian-eigenthings' HessianOperator (autograd matvec, graph rebuilt per product)."""

    def __init__(self, case: Case, quick: bool):
        import hessian_eigenthings as he

        criterion = case.criterion

        def loss_fn(model, batch):
            inputs, targets = batch
            return criterion(model(**inputs).logits, targets)

        self.attention = "math SDPA kernel (sdpa_kernel(SDPBackend.MATH))"
        self.context = math_kernel
        self.op = he.HessianOperator(case.model, [case.data], loss_fn)
        try:
            self.product(torch.randn(self.op.size))
        except RuntimeError as exc:
            self.attention = f"eager attention (math kernel failed: {str(exc).splitlines()[0][:80]})"
            self.context = nullcontext
            eager = build("gpt2" if case.shift else "bert", quick, attn="eager")
            self.op = he.HessianOperator(eager.model, [eager.data], loss_fn)

    def product(self, v):
        with self.context():
            return self.op.matvec(v)


# ------------------------------------------------------------------ memory, one child per configuration
def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def _peak(out: dict, key: str):
    """out[key] = peak resident-set growth (MB) over the block, above the resident set at its start."""
    base = settle_kb()
    exact = _reset_peak()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    if exact:
        out[key] = (status_kb("VmHWM") - base) / 1024
    else:  # ru_maxrss only rises: its growth bounds the block's peak from below
        out[key] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(before_max, base), 0) / 1024
    out["peak_measure"] = "VmHWM reset" if exact else "ru_maxrss growth"


def _run_config(case: Case, config: str, quick: bool) -> dict:
    n = sum(p.numel() for p in case.params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    out: dict = {}
    base = settle_kb()
    if config == "gradient":
        with _peak(out, "first"):
            g = torch.autograd.grad(case.loss(), case.params)
        del g
    elif config.startswith("hk_"):
        cls = hk.HessianOperator if "hvp" in config else hk.GGNOperator
        op = cls(case.model, case.criterion, case.data, cache_memory=float("inf") if "reused" in config else 0)
        with _peak(out, "first"):
            r = op @ v
        del r
        if "reused" in config:
            out["held"] = (settle_kb() - base) / 1024
            with _peak(out, "later"):
                r = op @ v
            del r
            op.clear_cache()
            out["after_clear_cache"] = (settle_kb() - base) / 1024
    elif config == "pyhessian_kept":
        with _peak(out, "first"):
            runner = PyHessianRunner(case, quick, kept=True, rebuilt=False)
            r = runner.product_kept(v)
        del r
        out["held"] = (settle_kb() - base) / 1024
        with _peak(out, "later"):
            r = runner.product_kept(v)
        del r, runner
    elif config == "pyhessian_rebuilt":
        runner = PyHessianRunner(case, quick, kept=False, rebuilt=True)
        base = settle_kb()
        with _peak(out, "first"):
            r = runner.product_rebuilt(v)
        del r, runner
    elif config == "eigenthings":
        runner = EigenthingsRunner(case, quick)
        base = settle_kb()
        with _peak(out, "first"):
            r = runner.product(v)
        del r, runner
    else:
        raise ValueError(config)
    return out


def child(model_name: str, config: str, quick: bool) -> None:
    """One configuration in this fresh process: first on the tiny model (so that the code it runs is
    paged in and not counted), then measured on the benchmark's model."""
    torch.set_num_threads(THREADS)
    _run_config(build(model_name, True), config, True)
    gc.collect()
    print("RESULT " + json.dumps(_run_config(build(model_name, quick), config, quick)))


def measure_memory(model_name: str, configs: list[str], quick: bool) -> dict[str, dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(THREADS))
    results = {}
    for config in configs:
        args = [sys.executable, str(Path(__file__).resolve()), "--child", model_name, config] + (["--quick"] if quick else [])
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
        line = [s for s in done.stdout.splitlines() if s.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            print(f"(memory child {model_name}/{config} failed: {done.stderr.strip().splitlines()[-1:]})")
            continue
        results[config] = json.loads(line[-1][len("RESULT "):])
    return results


# ------------------------------------------------------------------ timing
def rel_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


def product_costs(model_name: str, quick: bool, repeat: int, idea: bool) -> dict:
    case = build(model_name, quick)
    model, criterion, data, params = case.model, case.criterion, case.data, case.params
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))

    hvp = hk.HessianOperator(model, criterion, data)
    hvp_rebuilt = hk.HessianOperator(model, criterion, data, cache_memory=0)
    ggn = hk.GGNOperator(model, criterion, data)
    ggn_rebuilt = hk.GGNOperator(model, criterion, data, cache_memory=0)
    ph = PyHessianRunner(case, quick)
    eig = EigenthingsRunner(case, quick)

    reference = hvp @ v
    checks = {
        "hesskit HVP rebuilt": rel_diff(hvp_rebuilt @ v, reference),
        "hesskit GGN rebuilt vs reused": rel_diff(ggn_rebuilt @ v, ggn @ v),
        "PyHessian kept graph": rel_diff(ph.product_kept(v), reference),
        "PyHessian dataloader_hv_product": rel_diff(ph.product_rebuilt(v), reference),
        "hessian-eigenthings matvec": rel_diff(eig.product(v), reference),
    }

    def gradient(m=model, p=params):
        return torch.autograd.grad(criterion(m(**case.inputs).logits, case.targets), p)

    def gradient_math():
        with math_kernel():
            return gradient()

    fns = {
        "gradient (reference: forward + backward, default SDPA kernel)": gradient,
        "gradient, math SDPA kernel": gradient_math,
        "hesskit HVP, graph reused": lambda: hvp @ v,
        "hesskit HVP, graph rebuilt (cache_memory=0)": lambda: hvp_rebuilt @ v,
        "hesskit GGN product, graph reused": lambda: ggn @ v,
        "hesskit GGN product, graph rebuilt (cache_memory=0)": lambda: ggn_rebuilt @ v,
        "PyHessian HVP, graph kept (hessian_vector_product)": lambda: ph.product_kept(v),
        "PyHessian dataloader_hv_product (graph rebuilt)": lambda: ph.product_rebuilt(v),
        "hessian-eigenthings HVP (matvec, graph rebuilt)": lambda: eig.product(v),
    }
    if idea:
        fused = build(model_name, quick, activation="gelu_pytorch_tanh")
        fused.model.load_state_dict(model.state_dict())
        fparams = fused.params
        fhvp = hk.HessianOperator(fused.model, fused.criterion, fused.data)
        checks["HVP with gelu_pytorch_tanh vs gelu_new"] = rel_diff(fhvp @ v, reference)
        fns["idea: gradient, gelu_pytorch_tanh"] = lambda: gradient(fused.model, fparams)
        fns["idea: hesskit HVP, graph reused, gelu_pytorch_tanh"] = lambda: fhvp @ v
    del reference
    seconds = timed_interleaved(fns, repeat)
    return {"case": case, "n": n, "seconds": seconds, "checks": checks,
            "attention": {"PyHessian": ph.attention, "hessian-eigenthings": eig.attention}}


MEMORY_ROW = {
    "gradient (reference: forward + backward, default SDPA kernel)": "gradient",
    "hesskit HVP, graph reused": "hk_hvp_reused",
    "hesskit HVP, graph rebuilt (cache_memory=0)": "hk_hvp_rebuilt",
    "hesskit GGN product, graph reused": "hk_ggn_reused",
    "hesskit GGN product, graph rebuilt (cache_memory=0)": "hk_ggn_rebuilt",
    "PyHessian HVP, graph kept (hessian_vector_product)": "pyhessian_kept",
    "PyHessian dataloader_hv_product (graph rebuilt)": "pyhessian_rebuilt",
    "hessian-eigenthings HVP (matvec, graph rebuilt)": "eigenthings",
}


def print_table(result: dict, memory: dict) -> None:
    case, seconds = result["case"], result["seconds"]
    grad = seconds["gradient (reference: forward + backward, default SDPA kernel)"]
    batch, seq = case.inputs["input_ids"].shape
    print(f"\n#### {case.name} (n = {result['n']:,}, batch {batch} x {seq} tokens)\n")
    print("| product | ms | x gradient | peak MB, first product | peak MB, later product | held between products MB |")
    print("|---|---:|---:|---:|---:|---:|")
    fmt = lambda d, k: f"{d[k]:.0f}" if k in d else "-"  # noqa: E731
    for name, s in seconds.items():
        mem = memory.get(MEMORY_ROW.get(name, ""), {})
        print(f"| {name} | {s * 1e3:.0f} | {s / grad:.2f} | {fmt(mem, 'first')} | {fmt(mem, 'later')} | {fmt(mem, 'held')} |")
    extra = [f"{k}: {v:.0f} MB" for k, v in ((c, m.get("after_clear_cache")) for c, m in memory.items()) if v is not None]
    if extra:
        print(f"\nResident-set growth left after `op.clear_cache()`: {', '.join(extra)}.")
    measures = {m.get("peak_measure") for m in memory.values()} - {None}
    if measures:
        print(f"Peak measure: {', '.join(sorted(measures))}.")
    print("Attention for the competitors: " + "; ".join(f"{k}: {v}" for k, v in result["attention"].items()) + ".")
    print("Products against hesskit's HVP on the same vector (relative difference): "
          + "; ".join(f"{k} {v:.1e}" for k, v in result["checks"].items()) + ".")


# ------------------------------------------------------------------ profile
def _events(prof):
    return [e for e in prof.key_averages() if e.key != "[memory]"]


GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")
NODE = "autograd::engine::evaluate_function: "


def profile_products(quick: bool, top: int) -> None:
    """torch.profiler (CPU) over `calls` calls each of a gradient and a reused HVP, on GPT-2 as it is and
    with gelu_pytorch_tanh; per-call milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    calls = 1 if quick else 2
    case = build("gpt2", quick)
    fused = build("gpt2", quick, activation="gelu_pytorch_tanh")
    fused.model.load_state_dict(case.model.state_dict())
    params = case.params
    op = hk.HessianOperator(case.model, case.criterion, case.data)
    fop = hk.HessianOperator(fused.model, fused.criterion, fused.data)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2))
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-use costs, not counted
        torch.autograd.grad(case.loss(), params)
    runs = {}
    for label, fn in [("gradient", lambda: torch.autograd.grad(case.loss(), params)),
                      ("HVP, graph reused", lambda: op @ v),
                      ("HVP, graph reused, gelu_pytorch_tanh", lambda: fop @ v)]:
        fn()  # warm up; builds the cached graph
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            wall = (time.perf_counter() - start) / calls
        events = [e for e in prof.key_averages() if e.key != "[memory]"]
        runs[label] = (events, wall)
    print(f"\n#### Profile: GPT-2, a gradient and a reused hesskit HVP (torch.profiler, CPU, {calls} calls each)\n")
    print("Top aten operators by self CPU time (ms per call, share of the run's self CPU time; calls per call):\n")
    print("| | " + " | ".join(runs) + " |")
    print("|---:|" + "---|" * len(runs))
    columns = []
    for label, (events, wall) in runs.items():
        ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        columns.append([f"{e.key[6:]} {e.self_cpu_time_total / 1e3 / calls:.0f} ({100 * e.self_cpu_time_total / total:.0f}%; "
                        f"{e.count // calls})" for e in ops[:top]])
    for i in range(top):
        print(f"| {i + 1} | " + " | ".join(c[i] if i < len(c) else "" for c in columns) + " |")
    print()
    for label, (events, wall) in runs.items():
        gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMMS) / 1e3 / calls
        rest = sum(e.self_cpu_time_total for e in events) / 1e3 / calls - gemm
        print(f"- {label}: {wall * 1e3:.0f} ms wall per call; matrix products (mm, addmm, bmm) {gemm:.0f} ms, "
              f"everything else {rest:.0f} ms (self CPU)")
    print("\nThe HVPs' time by autograd node (CPU total per call, share of the call's wall time; calls). A double "
          "backward runs the nodes of the create_graph backward's own ops (MmBackward0 for its matmuls, "
          "NativeLayerNormBackwardBackward0, TanhBackwardBackward0, ...) and then those of the forward "
          "(AddmmBackward0 for the Conv1D projections):\n")
    hvps = [label for label in runs if label.startswith("HVP")]
    print("| | " + " | ".join(hvps) + " |")
    print("|---:|" + "---|" * len(hvps))
    columns = []
    for label in hvps:
        events, wall = runs[label]
        nodes = sorted((e for e in events if e.key.startswith(NODE)), key=lambda e: e.cpu_time_total, reverse=True)
        columns.append([f"{e.key[len(NODE):]} {e.cpu_time_total / 1e3 / calls:.0f} "
                        f"({100 * e.cpu_time_total / 1e6 / calls / wall:.0f}%; {e.count // calls})" for e in nodes[:top]])
    for i in range(top):
        print(f"| {i + 1} | " + " | ".join(c[i] if i < len(c) else "" for c in columns) + " |")


# ------------------------------------------------------------------ main
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: check that the script runs")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.quick)
        return
    import transformers

    start = time.perf_counter()
    torch.set_num_threads(THREADS)
    print(f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}, float32; load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\nTimes: median of interleaved calls; x gradient = against one gradient (forward + backward); memory:"
          " resident-set growth in a fresh process per configuration (see the docstring).")
    plan = [("gpt2", 7, True), ("bert", 9, False)]
    for model_name, repeat, idea in plan:
        result = product_costs(model_name, args.quick, 2 if args.quick else repeat, idea)
        configs = (["hk_hvp_reused"] if model_name == "gpt2" else []) if args.quick else CHILD_CONFIGS
        gc.collect()
        memory = measure_memory(model_name, configs, args.quick)
        print_table(result, memory)
        del result
        gc.collect()
    profile_products(args.quick, 5 if args.quick else 10)
    print(f"\nTotal wall time {time.perf_counter() - start:.0f} s; load average at end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
