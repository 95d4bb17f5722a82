# hk.quant and hk.prune on Hugging Face transformers built from small configs (random weights,
# nothing downloaded). GPT-2 keeps its projections in transformers' Conv1D (weight stored (in, out)):
# every result must equal that of the same model with each Conv1D swapped for the nn.Linear it is.
# Also: dict inputs and ModelOutputs, sequence criteria, GPT-2's tied lm_head/wte, the report every
# compressed copy carries, OBD's cost-based choice on a language model, models left unchanged.

import copy
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesskit as hk
from hesskit import prune, quant
from hesskit.prune.pruning import pruning_order
from hesskit.quant.allocate import fine_tuning_order, layer_macs
from hesskit.quant.fake import QuantizedLayer, layer_weight
from hesskit.quant.gptq import gptq_layers, layer_hessian, layer_inputs, round_to_nearest

import transformers  # noqa: E402 (a test dependency: never skipped)
from hf_zoo import linear_twin  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB, LENGTH, EMBED, HEADS, BLOCKS = 30, 8, 16, 2, 2
CONV1D = [f"transformer.h.{i}.{name}" for i in range(BLOCKS)
          for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def lm_loss(out, y):
    """Token cross-entropy of (B, T, V) logits against (B, T) labels."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def gpt2(dropout=0.0):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=EMBED, n_layer=BLOCKS, n_head=HEADS, n_positions=16,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config).double().eval()


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=2 * EMBED, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).double()


def token_batches(sizes=(3, 2), classes=None, seed=1):
    """[({"input_ids", "attention_mask"}, labels)]: LM labels (the ids) or one class per sequence."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        ids = torch.randint(0, VOCAB, (size, LENGTH), generator=gen)
        labels = ids if classes is None else torch.randint(0, classes, (size,), generator=gen)
        out.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels))
    return out


def matrix(model, name):
    return layer_weight(model.get_submodule(name)).detach()


def assert_same_layers(a, b, names, atol=0.0):
    for name in names:
        torch.testing.assert_close(matrix(a, name), matrix(b, name), rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def lm():
    model = gpt2()
    return model, linear_twin(model), token_batches()


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", quant.UncompressedWarning)
        warnings.filterwarnings("ignore", message=".*vmap cannot run this model")
        yield


# --------------------------------------------------------------------------- Conv1D is a linear layer
def test_the_twin_is_the_same_model(lm):
    model, twin, batches = lm
    x = batches[0][0]
    torch.testing.assert_close(model(**x).logits, twin(**x).logits, rtol=0, atol=1e-13)


def test_conv1d_layers_are_counted_and_the_tied_weight_once(lm):
    model, _, _ = lm
    layers = quant.quantizable_layers(model)
    assert [n for n, m in layers.items() if type(m).__name__ == "Conv1D"] == CONV1D  # 4 per block
    assert list(layers) == ["transformer.wte", "transformer.wpe"] + CONV1D  # lm_head is transformer.wte
    assert list(gptq_layers(model)) == CONV1D  # Embeddings (and so the tied lm_head) stay float
    assert list(prune.prunable_layers(model)) == CONV1D
    assert layer_weight(model.transformer.h[0].attn.c_attn).shape == (3 * EMBED, EMBED)  # (out, in)


@pytest.mark.parametrize("granularity, group_size", [("tensor", None), ("channel", None), ("rows", 8),
                                                     ("columns", 8), ("columns", 5)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_model_and_model_size_equal_the_linear_twin(lm, granularity, group_size, symmetric):
    model, twin, _ = lm
    q, q_twin = (quant.quantize_model(m, 3, granularity, group_size, symmetric) for m in (model, twin))
    assert_same_layers(q, q_twin, quant.quantizable_layers(model))
    assert quant.model_size(model, 3, granularity, group_size, symmetric) == \
        quant.model_size(twin, 3, granularity, group_size, symmetric)


def test_per_channel_ranges_are_per_output_feature_and_rows_are_heads(lm):
    model, _, _ = lm
    c_attn = model.transformer.h[0].attn.c_attn  # stored (16, 48): outputs [Q | K | V], 2 heads of 8 each
    q = quant.quantize_model(model, 3, "channel").get_submodule("transformer.h.0.attn.c_attn")
    for j in range(3 * EMBED):  # column j of the stored weight is output feature j, with its own range
        torch.testing.assert_close(q.weight[:, j], quant.fake_quantize(c_attn.weight[:, j].detach(), 3), rtol=0, atol=0)
    head_dim = EMBED // HEADS
    q = quant.quantize_model(model, 3, "rows", head_dim).get_submodule("transformer.h.0.attn.c_attn")
    for h in range(3 * HEADS):  # Q heads, K heads, V heads: one range each
        cols = slice(h * head_dim, (h + 1) * head_dim)
        torch.testing.assert_close(q.weight[:, cols], quant.fake_quantize(c_attn.weight[:, cols].detach(), 3,
                                                                          granularity="tensor"), rtol=0, atol=0)


def test_quantization_aware_and_freeze_on_conv1d_and_the_tied_head(lm):
    model, twin, batches = lm
    x = batches[0][0]
    qat, qat_twin = (quant.quantization_aware(m, 3, granularity="channel") for m in (model, twin))
    assert isinstance(qat.transformer.h[0].attn.c_attn, QuantizedLayer)
    assert isinstance(qat.lm_head, QuantizedLayer)  # the tied head uses the quantized weight too
    torch.testing.assert_close(qat(**x).logits, qat_twin(**x).logits, rtol=0, atol=1e-12)
    frozen, rtn = quant.freeze(qat), quant.quantize_model(model, 3, "channel")
    assert_same_layers(frozen, rtn, quant.quantizable_layers(model))
    assert frozen.lm_head.weight is frozen.transformer.wte.weight  # still tied
    torch.testing.assert_close(qat(**x).logits, frozen(**x).logits, rtol=0, atol=1e-12)
    loss = lm_loss(qat(**x).logits, batches[0][1])
    loss.backward()  # straight-through gradients reach the stored (in, out) weight
    assert qat.transformer.h[0].attn.c_attn.layer.weight.grad.shape == (EMBED, 3 * EMBED)


# --------------------------------------------------------------------------- GPTQ
def test_gptq_on_conv1d_equals_the_linear_twin_and_takes_dict_inputs(lm):
    model, twin, batches = lm
    calibration = [x for x, _ in batches]  # dicts
    options = dict(bits=3, group_size=8, act_order=True)
    q, q_twin = quant.gptq(model, calibration, **options), quant.gptq(twin, calibration, **options)
    assert_same_layers(q, q_twin, CONV1D, atol=1e-12)
    assert q.compression.layers == {name: "Conv1D" for name in CONV1D}
    assert not torch.equal(matrix(q, CONV1D[0]), matrix(model, CONV1D[0]))  # written back into the Conv1D
    same = quant.gptq(model, batches, **options)  # (inputs, labels) pairs contribute their inputs
    assert_same_layers(q, same, CONV1D)
    one, first = quant.gptq(model, batches[0], **options), quant.gptq(model, batches[0][0], **options)
    assert_same_layers(one, first, CONV1D)  # one (inputs, labels) tuple: the labels are not inputs
    r, r_twin = round_to_nearest(model, 3, group_size=8), round_to_nearest(twin, 3, group_size=8)
    assert_same_layers(r, r_twin, CONV1D)
    assert r.compression.method == "round_to_nearest" and list(r.compression.layers) == CONV1D


def test_layer_hessian_and_inputs_of_a_conv1d(lm):
    model, twin, batches = lm
    x = batches[0][0]
    H = layer_hessian(model, "transformer.h.0.mlp.c_proj", x)
    assert H.shape == (4 * EMBED, 4 * EMBED)
    torch.testing.assert_close(H, layer_hessian(twin, "transformer.h.0.mlp.c_proj", x), rtol=1e-12, atol=0)
    layer = model.transformer.h[0].attn.c_attn
    rows = layer_inputs(layer, torch.randn(3, LENGTH, EMBED, dtype=torch.float64))
    assert rows.shape == (3 * LENGTH, EMBED)


# --------------------------------------------------------------------------- sensitivities
def test_sensitivities_equal_the_linear_twin(lm):
    model, twin, batches = lm
    names = list(quant.quantizable_layers(model))
    measured = [quant.sensitivities(m, lm_loss, batches, "measured", bits=(2, 4)) for m in (model, twin)]
    assert list(measured[0]) == names  # the tied weight once, as transformer.wte
    assert measured[0].table == measured[1].table
    eig = [quant.sensitivities(m, lm_loss, batches, "eigenvalue", tol=1e-8, layers=CONV1D[:2]) for m in (model, twin)]
    for name in CONV1D[:2]:
        assert eig[0][name] == pytest.approx(eig[1][name], rel=1e-6)
    traces = [quant.sensitivities(m, lm_loss, batches, "trace", num_matvecs=60) for m in (model, twin)]
    assert list(traces[0]) == names and traces[0].num_params == traces[1].num_params
    for name in names:  # the probes fall on different entries; the estimates agree within their errors
        a, b = traces[0], traces[1]
        assert abs(a[name] - b[name]) <= 5 * (a.stderr[name] ** 2 + b.stderr[name] ** 2) ** 0.5 + 1e-12, name
    qbert = quant.sensitivities(model, lm_loss, batches, "qbert", num_subsets=2, layers=["transformer.wte"],
                                tol=1e-4)
    assert list(qbert) == ["transformer.wte"] and len(qbert.samples["transformer.wte"]) == 2


def test_the_tied_weight_is_one_layer_everywhere(lm):
    model, _, batches = lm
    tied = model.transformer.wte.weight
    for metric in ("trace", "eigenvalue"):  # used to fail: "params[2]: no parameter named 'lm_head.weight'"
        s = quant.sensitivities(model, lm_loss, batches, metric, layers=["transformer.wte"])
        assert list(s) == ["transformer.wte"] and s.num_params["transformer.wte"] == tied.numel()
    size = quant.model_size(model, 4, "tensor", symmetric=True)  # one 16-bit scale per layer
    weights = sum(m.weight.numel() for m in quant.quantizable_layers(model).values())
    assert size.quantized_weights == weights == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("bias") or ".ln_" in n)
    assert size.total_bits == 4 * weights + 16 * len(quant.quantizable_layers(model)) + 64 * (
        sum(p.numel() for p in model.parameters()) - weights)
    q = quant.quantize_model(model, 2)
    assert q.lm_head.weight is q.transformer.wte.weight
    assert torch.equal(q.lm_head.weight, quant.fake_quantize(tied, 2))
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'transformer.wte'"):
        quant.quantize_model(model, {"lm_head": 4})
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'transformer.wte'"):
        quant.sensitivities(model, lm_loss, batches, "measured", bits=2, layers=["lm_head"])


def test_allocation_tables_read_conv1d_as_linear(lm):
    model, twin, batches = lm
    ones = dict.fromkeys(CONV1D, 1.0)
    tables = [quant.cost_table(m, ones, (2, 4), granularity="channel") for m in (model, twin)]
    np.testing.assert_allclose(tables[0].omega, tables[1].omega, rtol=1e-12)  # sums in another order
    assert (tables[0].num_params == tables[1].num_params).all()
    assert fine_tuning_order(model, ones, 2, granularity="channel") == \
        fine_tuning_order(twin, ones, 2, granularity="channel")
    macs = layer_macs(model, batches[0][0])  # dict inputs; MACs per sequence
    assert macs == layer_macs(twin, batches[0][0])
    assert macs["transformer.h.0.attn.c_attn"] == LENGTH * EMBED * 3 * EMBED
    assert macs["transformer.wte"] == LENGTH * EMBED * VOCAB  # the tied lm_head's matmul
    pairs = quant.pair_interactions(model, lm_loss, batches, (2, 8), layers=CONV1D[:2])
    assert pairs.terms.shape == (1, 2, 2) and pairs.layers == CONV1D[:2]


# --------------------------------------------------------------------------- pruning
def test_pruning_equals_the_linear_twin(lm):
    model, twin, batches = lm
    for prune_it in (lambda m: prune.magnitude(m, 0.5),
                     lambda m: prune.magnitude(m, 0.5, scope="layer"),
                     lambda m: prune.obd(m, lm_loss, batches, 0.5, num_matvecs=20),
                     lambda m: prune.obd(m, lm_loss, batches, 0.5, curvature="hessian", num_matvecs=10),
                     lambda m: prune.obd(m, lm_loss, batches, 0.5, curvature="empirical_fisher"),
                     lambda m: prune.obs(m, lm_loss, batches, 0.6, block_size=100, num_recomputations=2)):
        pruned, pruned_twin = prune_it(model), prune_it(twin)
        assert prune.sparsity(pruned).overall == pytest.approx(prune.sparsity(pruned_twin).overall)
        assert_same_layers(pruned, pruned_twin, CONV1D, atol=1e-12)
        assert pruned.compression.layers == {name: "Conv1D" for name in CONV1D}
    G, G_twin = (prune.per_sample_gradients(m, lm_loss, batches) for m in (model, twin))
    torch.testing.assert_close(G, G_twin, rtol=1e-10, atol=1e-13)  # columns in the (out, in) order
    assert G.shape == (5, sum(matrix(model, n).numel() for n in CONV1D))


def test_gradual_pruning_of_a_language_model_equals_the_linear_twin(lm):
    model, twin, batches = lm
    (pruned, history), (pruned_twin, history_twin) = (
        prune.gradual(m, lm_loss, batches, [0.3, 0.5], method="magnitude", finetune_steps=2, lr=1e-3)
        for m in (model, twin))
    assert_same_layers(pruned, pruned_twin, CONV1D, atol=1e-12)
    assert history.sparsity == pytest.approx([0.3, 0.5], abs=1e-3)
    assert history.loss_finetuned == pytest.approx(history_twin.loss_finetuned, rel=1e-10)
    assert pruned.compression.method == "gradual" and pruned.compression.details["method"] == "magnitude"


def test_obs_dense_with_a_hessian_in_the_pruning_order(lm):
    model, twin, batches = lm
    layer = ["transformer.h.0.attn.c_proj"]
    weight = model.get_submodule(layer[0]).weight
    order = pruning_order(model, layer)  # parameter order -> (out, in) order
    assert torch.equal(weight.detach().reshape(-1)[order], matrix(model, layer[0]).reshape(-1))
    assert torch.equal(pruning_order(twin, layer), torch.arange(EMBED * EMBED))
    H = hk.GGNOperator(model, lm_loss, batches[1:], params=[weight]).dense()[order][:, order]
    pruned, pruned_twin = (prune.obs_dense(m, H, 0.5, layers=layer, damping=1e-3) for m in (model, twin))
    assert_same_layers(pruned, pruned_twin, layer, atol=1e-12)


def test_obd_on_a_language_model_picks_an_estimate_and_says_so(lm):
    model, twin, batches = lm
    start = time.perf_counter()
    pruned = prune.obd(model, lm_loss, batches, 0.5)  # C = T x V = 240 outputs per sample > 100 products
    assert time.perf_counter() - start < 30
    details = pruned.compression.details
    assert details["diagonal"] in ("hutchinson", "xdiag") and details["num_matvecs"] == 100  # an estimate, not exact
    assert details["outputs_per_sample"] == LENGTH * VOCAB

    # the last token only: C = V = 30 <= 100, so the exact GGN diagonal; output_fn picks it
    last = [(x, y[:, -1]) for x, y in batches[1:]]
    pick = dict(output_fn=lambda out: out.logits[:, -1])
    exact, exact_twin = (prune.obd(m, nn.CrossEntropyLoss(), last, 0.5, **pick) for m in (model, twin))
    assert exact.compression.details["diagonal"] == "exact"
    assert exact.compression.details["outputs_per_sample"] == VOCAB
    assert_same_layers(exact, exact_twin, CONV1D)
    weights = [model.get_submodule(n).weight for n in CONV1D]
    reference = hk.GGNOperator(model, nn.CrossEntropyLoss(), last, params=weights, **pick).exact_diagonal()
    diagonal = prune.obd_diagonal(model, nn.CrossEntropyLoss(), last, **pick)
    torch.testing.assert_close(diagonal, reference[pruning_order(model)], rtol=1e-10, atol=1e-14)
    forced = prune.obd(model, nn.CrossEntropyLoss(), last, 0.5, exact=False, num_matvecs=10, **pick)
    assert forced.compression.details["diagonal"] in ("hutchinson", "xdiag")  # estimated although exact is cheap


# --------------------------------------------------------------------------- reports and warnings
def test_every_compression_function_reports_its_layers_and_warns_once(lm):
    model, _, batches = lm
    calls = {
        "quantize_model": lambda layers: quant.quantize_model(model, 4 if layers is None else dict.fromkeys(layers, 4)),
        "gptq": lambda layers: quant.gptq(model, batches, 4, layers=layers),
        "round_to_nearest": lambda layers: round_to_nearest(model, 4, layers=layers),
        "magnitude": lambda layers: prune.magnitude(model, 0.5, layers=layers),
        "obd": lambda layers: prune.obd(model, lm_loss, batches, 0.5, layers=layers, num_matvecs=5),
        "obs": lambda layers: prune.obs(model, lm_loss, batches, 0.5, layers=layers, num_grads=3),
        "gradual": lambda layers: prune.gradual(model, lm_loss, batches, [0.2, 0.4], method="obs", num_grads=3,
                                                finetune_steps=1, layers=layers)[0],
    }
    for method, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compressed = call(None)
        named = [w for w in caught if issubclass(w.category, quant.UncompressedWarning)]
        assert len(named) == 1, method  # once per call, gradual included
        text = str(named[0].message)
        assert text.startswith(method) and "5 LayerNorm: transformer.h.0.ln_1" in text and "transformer.ln_f" in text
        report = compressed.compression
        assert isinstance(report, quant.CompressionReport) and report.method == method
        assert set(CONV1D) <= set(report.layers) and "lm_head" not in report.layers
        assert report.skipped["transformer.ln_f"] == "LayerNorm"
        if method != "quantize_model":
            assert "transformer.wte (also lm_head)" in text and report.skipped["transformer.wte"] == "Embedding"
        with warnings.catch_warnings(record=True) as caught:  # layers chosen by the caller: no warning
            warnings.simplefilter("always")
            chosen = call(CONV1D[:2])
        assert not [w for w in caught if issubclass(w.category, quant.UncompressedWarning)], method
        assert list(chosen.compression.layers) == CONV1D[:2]


# --------------------------------------------------------------------------- inputs and errors
def test_one_dict_batch_is_one_batch_and_criteria_see_logits(lm):
    model, _, batches = lm
    pair = batches[0]
    def baseline(data):  # the model's mean loss over data (the loss "measured" compares against)
        return quant.sensitivities(model, lm_loss, data, "measured", bits=8, layers=CONV1D[:1]).baseline_loss

    assert baseline(pair) == baseline([pair])
    reference = lm_loss(model(**pair[0]).logits, pair[1]).item()
    assert baseline(pair) == pytest.approx(reference, rel=1e-14)
    one, listed = (prune.obs(model, lm_loss, data, 0.5, num_grads=3, seed=0) for data in (pair, [pair]))
    assert prune.sparsity(one).overall == pytest.approx(0.5)
    sub = prune.per_sample_gradients(model, lm_loss, pair, num_grads=2, seed=0)  # drawn before computing
    full = prune.per_sample_gradients(model, lm_loss, pair)
    torch.testing.assert_close(sub, full[torch.randperm(3, generator=torch.Generator().manual_seed(0))[:2]])
    s = quant.sensitivities(model, lm_loss, pair, "measured", bits=2, layers=CONV1D[:1],
                            output_fn=lambda out: out["logits"])
    assert s.baseline_loss == pytest.approx(reference, rel=1e-14)


def test_clear_errors(lm):
    model, _, batches = lm
    with pytest.raises(ValueError, match=r"layers: unknown layer names \['transformer.wte'\], not Linear/Conv1D"):
        quant.gptq(model, batches, 4, layers=["transformer.wte"])
    with pytest.raises(TypeError, match="GPTQ supports .*Conv1D.*got LayerNorm"):
        layer_hessian(model, "transformer.ln_f", batches)
    with pytest.raises(TypeError, match="output_fn: expected it to return a tensor"):
        prune.obd(model, lm_loss, batches, 0.5, output_fn=lambda out: out.logits.tolist())
    with pytest.raises(TypeError, match="exact: expected None"):
        prune.obd(model, lm_loss, batches, 0.5, exact="yes")
    x, y = batches[1]
    padded = [(x, torch.where(torch.arange(LENGTH) < LENGTH - 3 * torch.arange(2)[:, None], y, -100))]
    with pytest.raises(ValueError, match="per-sample losses.*pass exact=False"):  # token means of unequal lengths
        prune.obd(model, lm_loss, padded, 0.5, exact=True)
    with pytest.raises(ValueError, match="data: batch 0 should be an \\(inputs, targets\\) pair"):
        quant.sensitivities(model, lm_loss, [batches[0][0]], "measured", bits=2)
    with pytest.raises(TypeError, match="calibration_inputs"):
        quant.gptq(model, 3, 4)


# --------------------------------------------------------------------------- models left unchanged
def snapshot(model):
    return dict(state={k: v.clone() for k, v in model.state_dict().items()},
                grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
                flags={n: p.requires_grad for n, p in model.named_parameters()},
                modes={n: m.training for n, m in model.named_modules()},
                ids={n: id(p) for n, p in model.named_parameters(remove_duplicate=False)})


def assert_unchanged(model, before, what):
    after = snapshot(model)
    assert after["flags"] == before["flags"] and after["modes"] == before["modes"], what
    assert after["ids"] == before["ids"], what
    for key in before["state"]:
        assert torch.equal(after["state"][key], before["state"][key]), (what, key)
    for key, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][key] is None), (what, key)
        assert grad is None or torch.equal(grad, after["grads"][key]), (what, key)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_every_function_leaves_the_model_unchanged(name):
    if name == "gpt2":
        model, criterion, batches = gpt2(dropout=0.1), lm_loss, token_batches((3, 2))
        model.transformer.h[0].mlp.train()  # dropout 0.1 in train mode: compression runs in eval
    else:  # no dropout: the whole model in train mode
        model, criterion, batches = bert().train(), nn.CrossEntropyLoss(), token_batches((3, 2), classes=3)
    norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    norm.weight.requires_grad_(False)
    first = next(iter(prune.prunable_layers(model).values()))
    first.weight.requires_grad_(False)  # a frozen layer is still measured, quantized and pruned
    first.weight.grad = torch.ones_like(first.weight)
    before = snapshot(model)
    mode = dict(mode="eval") if name == "gpt2" else {}
    calls = {
        "quantize_model": lambda: quant.quantize_model(model, 3, "channel"),
        "model_size": lambda: quant.model_size(model, 3, "rows", 8),
        "quantization_aware": lambda: quant.freeze(quant.quantization_aware(model, 3, act_bits=8)),
        "gptq": lambda: quant.gptq(model, batches, 3),
        "round_to_nearest": lambda: round_to_nearest(model, 3),
        "layer_hessian": lambda: layer_hessian(model, next(iter(gptq_layers(model))), batches),
        "layer_macs": lambda: layer_macs(model, batches[0][0]),
        "trace": lambda: quant.sensitivities(model, criterion, batches, "trace", num_matvecs=4, **mode),
        "eigenvalue": lambda: quant.sensitivities(model, criterion, batches, "eigenvalue", num_matvecs=20,
                                                  layers=list(gptq_layers(model))[:1], **mode),
        "measured": lambda: quant.sensitivities(model, criterion, batches, "measured", bits=2, **mode),
        "magnitude": lambda: prune.magnitude(model, 0.5),
        "per_sample_gradients": lambda: prune.per_sample_gradients(model, criterion, batches, num_grads=2, seed=0),
        "obd": lambda: prune.obd(model, criterion, batches, 0.5, num_matvecs=5),
        "obs": lambda: prune.obs(model, criterion, batches, 0.5, num_grads=4, num_recomputations=2),
        "gradual": lambda: prune.gradual(model, criterion, batches, [0.3], method="obd", num_matvecs=4,
                                         finetune_steps=2),
    }
    for what, call in calls.items():
        call()
        assert_unchanged(model, before, what)
