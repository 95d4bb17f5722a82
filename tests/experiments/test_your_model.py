import matplotlib

matplotlib.use("Agg")

# Notebook 15's experiments: the padded token task, the BERT fine-tuning, block grouping by name, per-block
# curvature against dense blocks, the plain-torch Hessian-vector product of the notebook against
# hesskit's, the quantization and continued fine-tuning experiments and the explorer's per-block
# estimates against direct hesskit calls. None of them may touch the trained model. The explorer
# itself: tests/widgets/test_your_model_explorer.py.

import contextlib  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.quant.gptq import round_to_nearest  # noqa: E402
from hf_zoo import assert_unchanged, snapshot  # noqa: E402

from hesskit.experiments.tasks import evaluate  # noqa: E402
from hesskit.experiments.training import run_plan  # noqa: E402

import transformers  # noqa: E402,F401 (a test dependency: never skipped)

from hesskit.experiments.your_model import (  # noqa: E402
    CLS,
    DIAGONAL_METHODS,
    EIGENVALUE,
    ESTIMATORS,
    MIN_PRODUCTS,
    PAD,
    TRACE_METHODS,
    block_curvature,
    block_group,
    block_layer,
    block_sets,
    continue_finetuning,
    encoder_layers,
    estimate_block,
    gptq_vs_rtn,
    group_estimates,
    mixed_precision,
    quantize_bert,
    select,
    sophia_vs_adamw,
    step_seconds,
    tiny_bert,
    token_task,
    train_bert,
    whole_spectrum,
)
from fixtures.your_model import SMALL, task  # noqa: E402,F401 (pytest fixtures)

CE = nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- the task and the model
def test_token_task_pads_and_labels_the_most_frequent_kept_token():
    inputs, labels = token_task(200, vocab=5, min_length=3, max_length=9, seed=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (200, 10) and labels.shape == (200,)
    assert (ids[:, 0] == CLS).all() and (mask[:, 0] == 1).all()
    lengths = mask.sum(1) - 1
    assert lengths.min() >= 3 and lengths.max() <= 9 and (lengths < 9).any()  # some sequences are padded
    assert torch.equal(ids == PAD, mask == 0)  # padding exactly where the mask is 0
    assert ((mask[:, 1:-1] - mask[:, 2:]) >= 0).all()  # right padding
    for i in range(200):
        kept = (ids[i, 1:1 + lengths[i]] - 2).tolist()
        counts = [kept.count(v) for v in range(5)]
        assert labels[i].item() == counts.index(max(counts))  # ties: the smallest token
    again = token_task(200, vocab=5, min_length=3, max_length=9, seed=3)
    assert torch.equal(again[0]["input_ids"], ids) and torch.equal(again[1], labels)
    part = select(inputs, slice(5, 8))
    assert set(part) == {"input_ids", "attention_mask"} and torch.equal(part["input_ids"], ids[5:8])
    for bad in (dict(min_length=0), dict(min_length=10, max_length=9), dict(vocab=1)):
        with pytest.raises(ValueError):
            token_task(10, **bad)


def test_tiny_bert_is_a_hugging_face_model_with_sdpa_and_dropout():
    model = tiny_bert()
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert sum(p.numel() for p in model.parameters()) == 19_270
    assert model.config._attn_implementation == "sdpa" and model.config.hidden_dropout_prob == 0.1
    assert model.config.num_labels == 6 and model.config.vocab_size == 8 and model.config.max_position_embeddings == 17
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_bert().parameters()))  # seeded


def test_training_is_seeded_returns_an_eval_model_and_learns(task):
    model = task.trained.model
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert task.head_dim == 8 and task.heads == 2 and task.num_params == sum(p.numel() for p in model.parameters())
    assert len(task.trained.losses) == 40 and task.checkpoints.tolist() == [0, 20, 40]
    assert task.trained.losses[-10:].mean() < task.trained.losses[:10].mean()
    assert task.test_accuracy[-1] == evaluate(model, task.trained.test).accuracy
    again = train_bert(seed=0, **{**SMALL, "steps": 3, "eval_every": 3})
    twice = train_bert(seed=0, **{**SMALL, "steps": 3, "eval_every": 3})
    assert all(torch.equal(a, b) for a, b in zip(again.trained.model.parameters(), twice.trained.model.parameters()))
    np.testing.assert_array_equal(again.trained.losses, twice.trained.losses)
    batches = task.curvature_batches(2, 16, offset=8)
    assert len(batches) == 2 and torch.equal(batches[1][0]["input_ids"], task.trained.train[0]["input_ids"][24:40])
    calib = task.trained.calibration(4)  # dict inputs: every entry's first rows
    assert set(calib) == set(task.trained.train[0]) and all(torch.equal(v, task.trained.train[0][k][:4])
                                                           for k, v in calib.items())
    assert task.trained.seed == 0 and task.trained.config["steps"] == 40 and task.trained.train_seconds > 0
    assert torch.equal(batches[0][1], task.trained.train[1][8:24])
    with pytest.raises(ValueError, match="num_batches"):
        task.curvature_batches(100, 16)
    with pytest.raises(ValueError, match="batch_size"):
        train_bert(steps=1, batch_size=64, num_train=32)
    with pytest.raises(RuntimeError, match="diverged"):
        train_bert(seed=0, **{**SMALL, "steps": 5, "lr": 1e4})


def test_training_runs_through_the_shared_loop_with_its_batches_and_seeds(task):
    # train_bert's steps are hesskit.experiments.training's: run_plan's batches, the dropout masks
    # from `seed`, AdamW with BERT's schedule; written out here step by step
    model = tiny_bert(6, 16, hidden=16, layers=1, heads=2, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * max(0.0, 1 - s / 40))
    order, plan = run_plan(256, 40, 32, 20, seed=0)
    inputs, labels = task.trained.train
    state = torch.random.get_rng_state()
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for idx in order:
            model.train()
            opt.zero_grad()
            loss = CE(model(**select(inputs, idx)).logits, labels[idx])
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
    np.testing.assert_array_equal(task.trained.losses, losses)
    assert task.checkpoints.tolist() == plan and all(torch.equal(a, b) for a, b in
                                                     zip(task.trained.model.parameters(), model.parameters()))
    train_bert(seed=0, **{**SMALL, "steps": 2})
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left as it was


def test_evaluate_takes_dict_batches_restores_modes_and_matches_a_direct_computation(task):
    # the notebook scores its BERT with tasks.evaluate: dict inputs go in as model(**inputs)
    model = copy.deepcopy(task.trained.model).train()
    loss, accuracy = evaluate(model, task.trained.test).loss, evaluate(model, task.trained.test).accuracy
    assert model.training and model.bert.encoder.layer[0].attention.self.dropout.training
    with torch.no_grad():
        logits = task.trained.model(**task.trained.test[0]).logits
    assert loss == pytest.approx(CE(logits, task.trained.test[1]).item())
    assert accuracy == pytest.approx((logits.argmax(1) == task.trained.test[1]).double().mean().item())


# ----------------------------------------------------------------------------- groups
def test_block_groups_for_bert_gpt2_and_llama_names():
    bert = {"bert.embeddings.word_embeddings": ("embeddings", "embeddings"),
            "bert.embeddings.LayerNorm": ("LayerNorm", "embeddings"),
            "bert.encoder.layer.0.attention.self.query": ("attention", "layer 0"),
            "bert.encoder.layer.3.attention.output.dense": ("attention", "layer 3"),
            "bert.encoder.layer.0.attention.output.LayerNorm": ("LayerNorm", "layer 0"),
            "bert.encoder.layer.1.intermediate.dense": ("MLP", "layer 1"),
            "bert.encoder.layer.1.output.dense": ("MLP", "layer 1"),
            "bert.encoder.layer.1.output.LayerNorm": ("LayerNorm", "layer 1"),
            "bert.pooler.dense": ("head", "head"), "classifier": ("head", "head")}
    gpt2 = {"transformer.wte": ("embeddings", "embeddings"), "transformer.wpe": ("embeddings", "embeddings"),
            "transformer.h.0.ln_1": ("LayerNorm", "layer 0"), "transformer.h.0.attn.c_attn": ("attention", "layer 0"),
            "transformer.h.0.mlp.c_fc": ("MLP", "layer 0"), "transformer.ln_f": ("LayerNorm", "head")}
    llama = {"model.embed_tokens": ("embeddings", "embeddings"),
             "model.layers.2.self_attn.q_proj": ("attention", "layer 2"),
             "model.layers.2.post_attention_layernorm": ("LayerNorm", "layer 2"),
             "model.layers.2.mlp.gate_proj": ("MLP", "layer 2"), "model.norm": ("LayerNorm", "head"),
             "lm_head": ("head", "head")}
    for name, (group, layer) in {**bert, **gpt2, **llama}.items():
        assert (block_group(name), block_layer(name)) == (group, layer), name
    assert block_group("something") == "other" and block_layer("something") == "other"
    sets = block_sets(list(bert))
    assert list(sets) == ["embeddings", "layer 0 · attention", "layer 3 · attention", "layer 0 · LayerNorm",
                          "layer 1 · MLP", "layer 1 · LayerNorm", "head"]
    assert sets["embeddings"] == ["bert.embeddings.word_embeddings", "bert.embeddings.LayerNorm"]


# ----------------------------------------------------------------------------- the notebook's plain-torch HVP
def notebook_hvp(model, criterion, batches, v, math_kernel=True):
    """The plain-torch `hvp` of the notebook's section 4 (the same lines): H v of the mean loss over `batches`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in batches)
    out = torch.zeros_like(v)
    with sdpa_kernel(SDPBackend.MATH) if math_kernel else contextlib.nullcontext():
        for inputs, y in batches:
            loss = criterion(model(**inputs).logits, y)                    # dict inputs: model(**inputs)
            grads = torch.autograd.grad(loss, params, create_graph=True)    # g, kept differentiable
            g = torch.cat([t.reshape(-1) for t in grads])
            Hv = torch.autograd.grad(g @ v, params)                        # d(g . v) / d theta = H v
            out += len(y) / total * torch.cat([t.reshape(-1) for t in Hv])
    return out


def test_the_notebooks_hvp_equals_hesskits_and_eager_attention(task):
    model = copy.deepcopy(task.trained.model).double()
    batches = task.curvature_batches(2, 24)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    mine = notebook_hvp(model, CE, batches, v)
    ours = hk.HessianOperator(model, CE, batches) @ v
    torch.testing.assert_close(mine, ours, rtol=1e-10, atol=1e-12)
    eager = tiny_bert(hidden=16, layers=1, heads=2, attn_implementation="eager").double().eval()
    eager.load_state_dict(model.state_dict())
    torch.testing.assert_close(hk.HessianOperator(eager, CE, batches) @ v, ours, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="derivative for"):  # the default CPU kernel: no double backward
        notebook_hvp(model, CE, batches, v, math_kernel=False)
    # float32, the notebook's check: the same up to float32 rounding
    mine32 = notebook_hvp(task.trained.model, CE, batches, v.float())
    ours32 = hk.HessianOperator(task.trained.model, CE, batches) @ v.float()
    assert (mine32 - ours32).norm() <= 1e-4 * ours32.norm()
    with pytest.raises(ValueError, match="train mode"):
        hk.HessianOperator(copy.deepcopy(task.trained.model).train(), CE, batches)


# ----------------------------------------------------------------------------- per-block curvature
def test_block_curvature_against_dense_blocks(task):
    model = copy.deepcopy(task.trained.model).double()
    batches = task.curvature_batches(1, 32)
    op = hk.HessianOperator(model, CE, batches)
    snap = snapshot(model)
    bc = block_curvature(op, num_matvecs=60, tol=1e-6, seed=0)
    assert_unchanged(model, snap)
    names = [n for n, _ in op.blocks()]
    assert bc.names == names and bc.num_params.sum() == op.shape[0]
    assert bc.groups[0] == "embeddings" and bc.groups[-1] == "head" and set(bc.groups) <= set(
        ("embeddings", "attention", "MLP", "LayerNorm", "head"))
    for name in ("classifier", "bert.embeddings.LayerNorm", "bert.encoder.layer.0.output.LayerNorm"):
        i = names.index(name)
        dense = op.restrict([p for p in op.param_names if p.rpartition(".")[0] == name]).dense()
        exact = torch.linalg.eigvalsh(dense)
        assert abs(bc.trace[i] - dense.trace().item()) <= 5 * bc.trace_stderr[i] + 1e-8
        block = dict(op.blocks())[name]  # hk.trace's default, XTrace; exact for blocks of at most 60 parameters
        ref = hk.trace(block, 60, seed=0)
        assert bc.trace[i] == ref.value and bc.trace_stderr[i] == ref.stderr
        assert ref.method == ("exact" if dense.shape[0] <= 60 else "xtrace")
        assert bc.top[i] == pytest.approx(exact[-1].item(), rel=1e-4, abs=1e-8)
        assert bc.trace_per_param[i] == pytest.approx(bc.trace[i] / dense.shape[0])
    groups = bc.by_group()
    assert list(groups) == ["embeddings", "attention", "MLP", "LayerNorm", "head"]
    assert sum(g["params"] for g in groups.values()) == op.shape[0]
    assert groups["head"]["top"] == max(bc.top[i] for i, g in enumerate(bc.groups) if g == "head")
    assert groups["MLP"]["trace"] == pytest.approx(sum(bc.trace[i] for i, g in enumerate(bc.groups) if g == "MLP"))


def test_whole_spectrum(task):
    op = hk.HessianOperator(task.trained.model, CE, task.curvature_batches(1, 32))
    result = whole_spectrum(op, num_runs=2, num_steps=12, k=3)
    density, top, bottom = result["density"], result["top"], result["bottom"]
    assert density.nodes.shape == (2, 12) and np.allclose(density.weights.sum(1), 1)
    assert len(top.values) == 3 and (top.values[:-1] >= top.values[1:]).all()
    assert bottom.values[0] <= top.values[-1]
    assert density.nodes.max() <= top.values[0].item() * (1 + 1e-3) + 1e-6  # Ritz values stay inside the spectrum


# ----------------------------------------------------------------------------- quantization
def test_quantize_bert_against_group_by_group_rounding(task):
    model = task.trained.model
    snap = snapshot(model)
    encoder = encoder_layers(model)
    assert encoder == [f"bert.encoder.layer.0.{n}" for n in ("attention.self.query", "attention.self.key",
                                                            "attention.self.value", "attention.output.dense",
                                                            "intermediate.dense", "output.dense")]
    bits = dict(zip(encoder, (2, 3, 4, 2, 3, 2)))
    q = quantize_bert(model, bits, task.head_dim)
    assert_unchanged(model, snap)
    layers, qlayers = dict(model.named_modules()), dict(q.named_modules())
    for name, b in bits.items():
        w = layers[name].weight.detach()
        ref = torch.cat([hk.quant.fake_quantize(w[r:r + 8], b, True, "tensor")  # one symmetric range per head
                         for r in range(0, w.shape[0], 8)])
        torch.testing.assert_close(qlayers[name].weight, ref, rtol=0, atol=0)
    for name in ("bert.embeddings.word_embeddings", "bert.pooler.dense", "classifier"):
        torch.testing.assert_close(qlayers[name].weight,
                                   hk.quant.fake_quantize(layers[name].weight.detach(), 8, True, "tensor"), rtol=0, atol=0)
    assert torch.equal(qlayers["bert.encoder.layer.0.output.LayerNorm"].weight,
                       layers["bert.encoder.layer.0.output.LayerNorm"].weight)
    floating = quantize_bert(model, 3, task.head_dim, outer_bits=None)
    assert torch.equal(floating.classifier.weight, model.classifier.weight)
    with pytest.raises(ValueError, match="unknown layers"):
        quantize_bert(model, {"classifier": 2}, task.head_dim)


def test_mixed_precision_against_direct_calls(task):
    model = task.trained.model
    snap = snapshot(model)
    data = task.curvature_batches(2, 32)
    result = mixed_precision(model, data, task.trained.test, task.head_dim, avg_bits=2.5, num_subsets=2, uniform=(2, 3))
    assert_unchanged(model, snap)
    encoder = encoder_layers(model)
    assert result.sensitivity.metric == "qbert" and list(result.sensitivity) == encoder
    direct = hk.quant.sensitivities(model, CE, data, metric="qbert", num_subsets=2, layers=encoder, seed=0)
    assert all(result.sensitivity[n] == pytest.approx(direct[n]) for n in encoder)
    sizes = {n: dict(model.named_modules())[n].weight.numel() for n in encoder}
    assert sum(sizes[n] * b for n, b in result.allocation.items()) <= 2.5 * sum(sizes.values())
    assert [r.method for r in result.rows] == ["float32", "uniform 2-bit", "uniform 3-bit", "Hessian (qbert) mixed",
                                               "||ΔW||² only mixed"]
    assert result.row("float32").accuracy == evaluate(model, task.trained.test).accuracy
    mixed = result.row("Hessian (qbert) mixed")
    assert mixed.bits == dict(result.allocation) and mixed.average_bits <= 2.5
    assert mixed.accuracy == evaluate(quantize_bert(model, mixed.bits, task.head_dim), task.trained.test).accuracy
    assert result.row("uniform 3-bit").average_bits == 3 and result.row("uniform 3-bit").bits_per_weight > 3


def test_gptq_vs_rtn_against_direct_calls(task):
    model = task.trained.model
    snap = snapshot(model)
    calib = select(task.trained.train[0], slice(0, 64))
    result = gptq_vs_rtn(model, calib, task.trained.test, (2, 4), symmetric=True)
    assert_unchanged(model, snap)
    layers = encoder_layers(model)
    q = hk.quant.gptq(model, calib, 2, layers=layers, symmetric=True)
    rtn = round_to_nearest(model, 2, layers=layers, symmetric=True)
    assert result.gptq_accuracy[0] == evaluate(q, task.trained.test).accuracy
    assert result.rtn_accuracy[0] == evaluate(rtn, task.trained.test).accuracy
    assert result.gptq_loss[0] == pytest.approx(evaluate(q, task.trained.test).loss)
    assert result.float_accuracy == evaluate(model, task.trained.test).accuracy and len(result.seconds) == 2
    assert torch.equal(q.classifier.weight, model.classifier.weight)  # only the encoder is quantized


# ----------------------------------------------------------------------------- continued fine-tuning
def test_continue_finetuning(task):
    model = task.trained.model
    snap = snapshot(model)
    kw = dict(steps=6, batch_size=16, eval_every=3, monitor=64)
    adam = continue_finetuning(task, "adamw", 1e-3, **kw)
    again = continue_finetuning(task, "adamw", 1e-3, **kw)
    np.testing.assert_array_equal(adam.log.loss, again.log.loss)  # same batches, same dropout seed path
    sophia = continue_finetuning(task, "sophia-g", 1e-3, **kw)
    assert_unchanged(model, snap)
    for run in (adam, sophia):
        assert run.eval_steps.tolist() == [0, 3, 6] and len(run.log.loss) == 6 and not run.diverged
        watch = (select(task.trained.train[0], slice(0, 64)), task.trained.train[1][:64])
        assert run.evals["train_loss"][0] == pytest.approx(evaluate(model, watch).loss)
        assert run.evals["test_accuracy"][0] == evaluate(model, task.trained.test).accuracy
        assert math.isfinite(run.final_loss)
    adam_win, sophia_win = adam.per_step["win_rate"], sophia.per_step["win_rate"]
    assert np.isnan(adam_win).all() and ((sophia_win >= 0) & (sophia_win <= 1)).all()
    assert sophia.label == "Sophia-G (lr 0.001)" and adam.label == "AdamW (lr 0.001)"
    frozen = continue_finetuning(task, "adamw", 0.0, weight_decay=0.0, **kw)
    accuracy = frozen.evals["test_accuracy"]
    assert (accuracy == accuracy[0]).all()  # lr 0: the weights never move
    runs = sophia_vs_adamw(task, {"adamw": [1e-3], "sophia-g": [3e-4, 1e-3]}, **kw)
    assert [len(v) for v in runs.values()] == [1, 2]
    np.testing.assert_array_equal(runs["sophia-g"][1].log.loss, sophia.log.loss)
    for name, lr in (("adamw", 1e4), ("sophia-g", 1e35)):  # a non-finite loss, or Sophia's FloatingPointError
        bad = continue_finetuning(task, name, lr, **kw)
        assert bad.diverged and bad.final_loss == math.inf and bad.eval_steps[-1] == 6
        assert np.isnan(bad.evals["test_loss"][-1]) and np.isnan(bad.log.loss[-1]) and step_seconds(bad) >= 0
    with pytest.raises(ValueError, match="optimizer"):
        continue_finetuning(task, "sgd", 1e-3, **kw)


def test_sophia_g_closure_takes_the_model_output(task):
    # the notebook's closure: (loss, outputs) with outputs the Hugging Face ModelOutput
    model = copy.deepcopy(task.trained.model).train()
    inputs, labels = task.curvature_batches(1, 16)[0]
    opt = hk.optim.Sophia(model.parameters(), lr=1e-3, estimator="gnb")

    def closure():
        opt.zero_grad()
        outputs = model(**inputs)
        return CE(outputs.logits, labels), outputs

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert math.isfinite(loss.item()) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- the explorer's estimates
def test_estimate_block_against_direct_calls(task):
    model, data = task.trained.model, task.curvature_batches(1, 32)
    params = ["classifier.weight", "classifier.bias"]
    op = hk.HessianOperator(model, CE, data, params=params)
    ggn_op = hk.GGNOperator(model, CE, data, params=params)
    assert ESTIMATORS == ("XTrace trace", "Hutch++ trace", "Hutchinson trace", EIGENVALUE, "GGN diagonal (XDiag)",
                          "GGN diagonal (Hutchinson)")
    assert op.shape[0] > 12  # no estimator falls back to the exact answer here
    for estimator in ESTIMATORS:
        got = estimate_block(model, data, params, estimator, 12, seed=3)
        assert got["num_matvecs"] <= 12 and got["seconds"] >= 0
        if estimator in TRACE_METHODS:
            ref = hk.trace(op, 12, method=TRACE_METHODS[estimator], seed=3)
            assert ref.method == TRACE_METHODS[estimator]
            assert got["value"] == ref.value and got["error"] == ref.stderr and got["num_matvecs"] == 12
        elif estimator == EIGENVALUE:
            exact = torch.linalg.eigvalsh(op.dense())[-1].item()
            assert got["value"] == pytest.approx(exact, rel=1e-3) and got["converged"]
        else:
            ref = hk.diagonal(ggn_op, 12, method=DIAGONAL_METHODS[estimator], seed=3)
            assert ref.method == DIAGONAL_METHODS[estimator]
            ggn = ref.value
            np.testing.assert_allclose(got["entries"], ggn.double().numpy())
            assert got["value"] == pytest.approx(ggn.sum().item(), rel=1e-5) and math.isnan(got["error"])
    # XTrace's and XDiag's estimates differ from Hutchinson's with the same budget and seed
    assert estimate_block(model, data, params, "XTrace trace", 12, seed=3)["value"] != \
        estimate_block(model, data, params, "Hutchinson trace", 12, seed=3)["value"]
    with pytest.raises(ValueError, match="estimator"):
        estimate_block(model, data, params, "exact", 12)


def test_a_budget_below_the_estimators_minimum_is_raised_to_it(task):
    model, data = task.trained.model, task.curvature_batches(1, 16)
    params = ["classifier.weight", "classifier.bias"]
    op = hk.HessianOperator(model, CE, data, params=params)
    assert MIN_PRODUCTS == {"XTrace trace": 4, "Hutch++ trace": 3, "Hutchinson trace": 1, EIGENVALUE: 1,
                            "GGN diagonal (XDiag)": 4, "GGN diagonal (Hutchinson)": 1}
    for estimator in ESTIMATORS:
        got = estimate_block(model, data, params, estimator, 2, seed=0)  # hk.trace would refuse 2 for XTrace
        assert np.isfinite(got["value"])
        if estimator in ("XTrace trace", "GGN diagonal (XDiag)", "Hutch++ trace"):
            assert got["num_matvecs"] == MIN_PRODUCTS[estimator]
    assert estimate_block(model, data, params, "XTrace trace", 3, seed=0)["value"] == hk.trace(op, 4, seed=0).value
    with pytest.raises(ValueError, match="num_matvecs"):
        hk.trace(op, 3, seed=0)
    # the budget path of group_estimates never goes below the minimum or above the budget
    modules = {"bert.pooler.dense": ["bert.pooler.dense.weight", "bert.pooler.dense.bias"],
               "classifier": params}
    for estimator, products, budgets in (("XTrace trace", 3, [3]), ("XTrace trace", 4, [4]),
                                         ("XTrace trace", 16, [4, 8, 16]), ("Hutchinson trace", 16, [4, 8, 16]),
                                         ("Hutch++ trace", 8, [3, 4, 8]), ("GGN diagonal (XDiag)", 8, [8])):
        found = group_estimates(model, data, modules, estimator, products, seed=0)
        assert found["budgets"] == budgets and len(found["path"]) == len(budgets)
        assert all(MIN_PRODUCTS[estimator] <= p["num_matvecs"] <= max(products, MIN_PRODUCTS[estimator])
                   for p in found["path"])
