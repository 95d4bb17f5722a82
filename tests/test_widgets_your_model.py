import matplotlib

matplotlib.use("Agg")

# Notebook 15's module: the padded token task, the BERT fine-tuning, block grouping by name, per-block
# curvature against dense blocks, the plain-torch Hessian-vector product of the notebook against
# hesskit's, the quantization and continued fine-tuning experiments against direct hesskit calls,
# and the explorer driven through every control (an exception inside its Output widget would not
# fail the notebook test). None of them may touch the trained model.

import contextlib  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hf_zoo import assert_unchanged, snapshot  # noqa: E402

import transformers  # noqa: E402,F401 (a test dependency: never skipped)

from hesskit.widgets.your_model import (  # noqa: E402
    CLS,
    ESTIMATORS,
    PAD,
    YourModelExplorer,
    block_curvature,
    block_group,
    block_layer,
    block_sets,
    continue_finetuning,
    encoder_layers,
    estimate_block,
    evaluate,
    gptq_vs_rtn,
    mixed_precision,
    quantize_bert,
    select,
    sophia_vs_adamw,
    tiny_bert,
    token_task,
    train_bert,
    whole_spectrum,
)

CE = nn.CrossEntropyLoss()
SMALL = dict(steps=40, batch_size=32, num_train=256, num_test=128, hidden=16, layers=1, heads=2, eval_every=20)


@pytest.fixture(scope="module")
def task():
    return train_bert(seed=0, **SMALL)


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
    model = task.model
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert task.head_dim == 8 and task.heads == 2 and task.num_params == sum(p.numel() for p in model.parameters())
    assert len(task.losses) == 40 and task.checkpoints.tolist() == [0, 20, 40]
    assert task.losses[-10:].mean() < task.losses[:10].mean()
    assert task.test_accuracy[-1] == evaluate(model, task.test)[1]
    again = train_bert(seed=0, **{**SMALL, "steps": 3, "eval_every": 3})
    twice = train_bert(seed=0, **{**SMALL, "steps": 3, "eval_every": 3})
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), twice.model.parameters()))
    np.testing.assert_array_equal(again.losses, twice.losses)
    batches = task.curvature_batches(2, 16, offset=8)
    assert len(batches) == 2 and torch.equal(batches[1][0]["input_ids"], task.train[0]["input_ids"][24:40])
    assert torch.equal(batches[0][1], task.train[1][8:24])
    with pytest.raises(ValueError, match="num_batches"):
        task.curvature_batches(100, 16)
    with pytest.raises(ValueError, match="batch_size"):
        train_bert(steps=1, batch_size=64, num_train=32)


def test_evaluate_restores_modes_and_matches_a_direct_computation(task):
    model = copy.deepcopy(task.model).train()
    loss, accuracy = evaluate(model, task.test)
    assert model.training and model.bert.encoder.layer[0].attention.self.dropout.training
    with torch.no_grad():
        logits = task.model(**task.test[0]).logits
    assert loss == pytest.approx(CE(logits, task.test[1]).item())
    assert accuracy == pytest.approx((logits.argmax(1) == task.test[1]).double().mean().item())


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
    model = copy.deepcopy(task.model).double()
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
    mine32 = notebook_hvp(task.model, CE, batches, v.float())
    ours32 = hk.HessianOperator(task.model, CE, batches) @ v.float()
    assert (mine32 - ours32).norm() <= 1e-4 * ours32.norm()
    with pytest.raises(ValueError, match="train mode"):
        hk.HessianOperator(copy.deepcopy(task.model).train(), CE, batches)


# ----------------------------------------------------------------------------- per-block curvature
def test_block_curvature_against_dense_blocks(task):
    model = copy.deepcopy(task.model).double()
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
        assert bc.top[i] == pytest.approx(exact[-1].item(), rel=1e-4, abs=1e-8)
        assert bc.trace_per_param[i] == pytest.approx(bc.trace[i] / dense.shape[0])
    groups = bc.by_group()
    assert list(groups) == ["embeddings", "attention", "MLP", "LayerNorm", "head"]
    assert sum(g["params"] for g in groups.values()) == op.shape[0]
    assert groups["head"]["top"] == max(bc.top[i] for i, g in enumerate(bc.groups) if g == "head")
    assert groups["MLP"]["trace"] == pytest.approx(sum(bc.trace[i] for i, g in enumerate(bc.groups) if g == "MLP"))


def test_whole_spectrum(task):
    op = hk.HessianOperator(task.model, CE, task.curvature_batches(1, 32))
    result = whole_spectrum(op, num_runs=2, num_steps=12, k=3)
    density, top, bottom = result["density"], result["top"], result["bottom"]
    assert density.nodes.shape == (2, 12) and np.allclose(density.weights.sum(1), 1)
    assert len(top.values) == 3 and (top.values[:-1] >= top.values[1:]).all()
    assert bottom.values[0] <= top.values[-1]
    assert density.nodes.max() <= top.values[0].item() * (1 + 1e-3) + 1e-6  # Ritz values stay inside the spectrum


# ----------------------------------------------------------------------------- quantization
def test_quantize_bert_against_group_by_group_rounding(task):
    model = task.model
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
        ref = torch.cat([hk.quant.fake_quantize(w[r:r + 8], b) for r in range(0, w.shape[0], 8)])  # one range per head
        torch.testing.assert_close(qlayers[name].weight, ref, rtol=0, atol=0)
    for name in ("bert.embeddings.word_embeddings", "bert.pooler.dense", "classifier"):
        torch.testing.assert_close(qlayers[name].weight, hk.quant.fake_quantize(layers[name].weight.detach(), 8),
                                   rtol=0, atol=0)
    assert torch.equal(qlayers["bert.encoder.layer.0.output.LayerNorm"].weight,
                       layers["bert.encoder.layer.0.output.LayerNorm"].weight)
    floating = quantize_bert(model, 3, task.head_dim, outer_bits=None)
    assert torch.equal(floating.classifier.weight, model.classifier.weight)
    with pytest.raises(ValueError, match="unknown layers"):
        quantize_bert(model, {"classifier": 2}, task.head_dim)


def test_mixed_precision_against_direct_calls(task):
    model = task.model
    snap = snapshot(model)
    data = task.curvature_batches(2, 32)
    result = mixed_precision(model, data, task.test, task.head_dim, avg_bits=2.5, num_subsets=2, uniform=(2, 3))
    assert_unchanged(model, snap)
    encoder = encoder_layers(model)
    assert result.sensitivity.metric == "qbert" and list(result.sensitivity) == encoder
    direct = hk.quant.sensitivities(model, CE, data, metric="qbert", num_subsets=2, layers=encoder, seed=0)
    assert all(result.sensitivity[n] == pytest.approx(direct[n]) for n in encoder)
    sizes = {n: dict(model.named_modules())[n].weight.numel() for n in encoder}
    assert sum(sizes[n] * b for n, b in result.allocation.items()) <= 2.5 * sum(sizes.values())
    assert [r.method for r in result.rows] == ["float32", "uniform 2-bit", "uniform 3-bit", "Hessian (qbert) mixed",
                                               "||ΔW||² only mixed"]
    assert result.row("float32").accuracy == evaluate(model, task.test)[1]
    mixed = result.row("Hessian (qbert) mixed")
    assert mixed.bits == dict(result.allocation) and mixed.average_bits <= 2.5
    assert mixed.accuracy == evaluate(quantize_bert(model, mixed.bits, task.head_dim), task.test)[1]
    assert result.row("uniform 3-bit").average_bits == 3 and result.row("uniform 3-bit").bits_per_weight > 3


def test_gptq_vs_rtn_against_direct_calls(task):
    model = task.model
    snap = snapshot(model)
    calib = select(task.train[0], slice(0, 64))
    result = gptq_vs_rtn(model, calib, task.test, (2, 4), symmetric=True)
    assert_unchanged(model, snap)
    layers = encoder_layers(model)
    q = hk.quant.gptq(model, calib, 2, layers=layers, symmetric=True)
    rtn = hk.quant.round_to_nearest(model, 2, layers=layers, symmetric=True)
    assert result.gptq_accuracy[0] == evaluate(q, task.test)[1]
    assert result.rtn_accuracy[0] == evaluate(rtn, task.test)[1]
    assert result.gptq_loss[0] == pytest.approx(evaluate(q, task.test)[0])
    assert result.float_accuracy == evaluate(model, task.test)[1] and len(result.seconds) == 2
    assert torch.equal(q.classifier.weight, model.classifier.weight)  # only the encoder is quantized


# ----------------------------------------------------------------------------- continued fine-tuning
def test_continue_finetuning(task):
    model = task.model
    snap = snapshot(model)
    kw = dict(steps=6, batch_size=16, eval_every=3, monitor=64)
    adam = continue_finetuning(task, "adamw", 1e-3, **kw)
    again = continue_finetuning(task, "adamw", 1e-3, **kw)
    np.testing.assert_array_equal(adam.train_loss, again.train_loss)  # same batches, same dropout seed path
    sophia = continue_finetuning(task, "sophia-g", 1e-3, **kw)
    assert_unchanged(model, snap)
    for run in (adam, sophia):
        assert run.steps.tolist() == [0, 3, 6] and len(run.train_loss) == 6 and not run.diverged
        assert run.monitor_loss[0] == pytest.approx(evaluate(model, (select(task.train[0], slice(0, 64)),
                                                                     task.train[1][:64]))[0])
        assert run.test_accuracy[0] == evaluate(model, task.test)[1] and math.isfinite(run.final_loss)
    assert np.isnan(adam.win_rate).all() and ((sophia.win_rate >= 0) & (sophia.win_rate <= 1)).all()
    assert sophia.label == "Sophia-G (lr 0.001)" and adam.label == "AdamW (lr 0.001)"
    frozen = continue_finetuning(task, "adamw", 0.0, weight_decay=0.0, **kw)
    assert (frozen.test_accuracy == frozen.test_accuracy[0]).all()  # lr 0: the weights never move
    runs = sophia_vs_adamw(task, {"adamw": [1e-3], "sophia-g": [3e-4, 1e-3]}, **kw)
    assert [len(v) for v in runs.values()] == [1, 2]
    np.testing.assert_array_equal(runs["sophia-g"][1].train_loss, sophia.train_loss)
    with pytest.raises(ValueError, match="optimizer"):
        continue_finetuning(task, "sgd", 1e-3, **kw)


def test_sophia_g_closure_takes_the_model_output(task):
    # the notebook's closure: (loss, outputs) with outputs the Hugging Face ModelOutput
    model = copy.deepcopy(task.model).train()
    inputs, labels = task.curvature_batches(1, 16)[0]
    opt = hk.optim.Sophia(model.parameters(), lr=1e-3, estimator="gnb")

    def closure():
        opt.zero_grad()
        outputs = model(**inputs)
        return CE(outputs.logits, labels), outputs

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert math.isfinite(loss.item()) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- the explorer
def test_estimate_block_against_direct_calls(task):
    model, data = task.model, task.curvature_batches(1, 32)
    params = ["classifier.weight", "classifier.bias"]
    op = hk.HessianOperator(model, CE, data, params=params)
    for estimator in ESTIMATORS:
        got = estimate_block(model, data, params, estimator, 12, seed=3)
        assert got["num_matvecs"] <= 12 and got["seconds"] >= 0
        if estimator == ESTIMATORS[0]:
            ref = hk.trace(op, 12, method="hutchinson", seed=3)
            assert got["value"] == ref.value and got["error"] == ref.stderr
        elif estimator == ESTIMATORS[1]:
            assert got["value"] == hk.trace(op, 12, method="hutch++", seed=3).value
        elif estimator == ESTIMATORS[2]:
            exact = torch.linalg.eigvalsh(op.dense())[-1].item()
            assert got["value"] == pytest.approx(exact, rel=1e-3) and got["converged"]
        else:
            ggn = hk.diagonal(hk.GGNOperator(model, CE, data, params=params), 12, seed=3).value
            np.testing.assert_allclose(got["entries"], ggn.double().numpy())
            assert got["value"] == pytest.approx(ggn.sum().item(), rel=1e-5) and math.isnan(got["error"])
    with pytest.raises(ValueError, match="estimator"):
        estimate_block(model, data, params, "exact", 12)


def test_explorer_over_its_controls(task):
    model, data = task.model, task.curvature_batches(1, 16)
    snap = snapshot(model)
    explorer = YourModelExplorer(model, data, estimator=ESTIMATORS[0], products=4, max_products=6)
    explorer.show()
    r = explorer.result
    assert r["group"] == "embeddings" and r["names"] == explorer.sets["embeddings"] and r["per_parameter"]
    assert len(explorer.figure.axes) == 2
    assert explorer.figure.axes[0].get_xlabel().startswith("Tr(H) / parameters")
    assert explorer.figure.axes[1].get_xlabel() == "Hessian-vector products used"
    raw = explorer.estimates("embeddings", ESTIMATORS[0], 4)["per"]
    np.testing.assert_allclose(r["values"] * r["sizes"], [raw[n]["value"] for n in r["names"]])
    for group in explorer.controls["group"].options:  # every group once, through compute for speed
        result = explorer.compute(**{**explorer.values(), "group": group})
        assert result["names"] == explorer.sets[group] and np.isfinite(result["values"]).all()
    explorer.controls["group"].value = "head"  # through the controls
    assert explorer.result["names"] == ["bert.pooler.dense", "classifier"]
    for estimator in ESTIMATORS:
        explorer.controls["estimator"].value = estimator
        result = explorer.result
        assert result["estimator"] == estimator and len(result["values"]) == 2
        if estimator == ESTIMATORS[3]:
            assert all(result["entries"][n] is not None for n in result["names"])
            assert explorer.figure.axes[1].get_yscale() == "log"
        else:
            assert result["budgets"][-1] == 4 and len(result["path"]) == len(result["budgets"])
    explorer.controls["estimator"].value = ESTIMATORS[2]
    top = explorer.result["values"].copy()
    explorer.controls["per_parameter"].value = False
    np.testing.assert_array_equal(explorer.result["values"], top)  # an eigenvalue is not divided by n
    explorer.controls["estimator"].value = ESTIMATORS[1]
    total = explorer.result["values"]
    explorer.controls["per_parameter"].value = True
    np.testing.assert_allclose(explorer.result["values"] * explorer.result["sizes"], total)
    slider = explorer.controls["products"]
    slider.value = slider.max
    assert explorer.result["products"] == 6
    cached = len(explorer._cache)
    shown = []  # the status line while it computes: a bar counting the budgets of products of every estimate
    explorer.status.observe(lambda change: shown.append(change["new"]), names="value")
    slider.value = slider.min  # two modules at 3 products (3 // 4 and 3 // 2 give no smaller budget)
    assert any("products (budget) 6/6" in s and "<progress" in s for s in shown) and explorer.status.value == ""
    explorer.status.unobserve_all()
    slider.value = slider.max
    assert len(explorer._cache) == cached + 1  # the minimum is new, the maximum was cached
    assert_unchanged(model, snap)
    (output,) = explorer.output.outputs
    assert output["data"]["image/png"].startswith("iVBOR")


def test_explorer_checks_its_arguments(task):
    data = task.curvature_batches(1, 8)
    with pytest.raises(ValueError, match="group"):
        YourModelExplorer(task.model, data, group="decoder")
    with pytest.raises(ValueError, match="estimator"):
        YourModelExplorer(task.model, data, estimator="exact")
    with pytest.raises(ValueError, match="products"):
        YourModelExplorer(task.model, data, products=2)
