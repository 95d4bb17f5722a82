import matplotlib

matplotlib.use("Agg")

# Notebook 12's Q-BERT experiments: group-wise quantization of the tiny transformer against a reference
# written here group by group, exact size accounting by hand, the mixed-precision enumeration and
# quantization-aware fine-tuning. None of them may touch the trained model. The explorer:
# tests/widgets/test_qbert_explorer.py.

import itertools  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.qbert import (  # noqa: E402
    ENCODER,
    group_options,
    group_sweep,
    rows_per_head,
    mixed_precision,
    qat_finetune,
    quantize_transformer,
    ranges_per_matrix,
    train_tiny_transformer,
    transformer_size,
)
from hesskit.experiments.tasks import evaluate  # noqa: E402
from fixtures.qbert import assert_untouched, snapshot, task  # noqa: E402,F401 (pytest fixtures)


def reference_rows(W, bits, group_size):
    """Symmetric round-to-nearest, one range per `group_size` consecutive rows, one explicit loop per group."""
    W = W.detach().double()
    out = torch.empty_like(W)
    step = W.shape[0] if group_size is None else group_size
    qmax = 2 ** (bits - 1) - 1
    for start in range(0, W.shape[0], step):
        block = W[start:start + step]
        s = block.abs().max().item() / qmax
        out[start:start + step] = s * torch.clamp(torch.round(block / s), -qmax - 1, qmax)
    return out


# ----------------------------------------------------------------------------- training
def test_training_is_seeded_and_returns_an_eval_model(task):
    model = task.model
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert task.config["heads"] == task.model.attn.heads == 4 and task.config["dim"] == 16
    assert rows_per_head(task.model) == 4
    (x, y), (xt, yt) = task.train, task.test
    assert x.shape == (512, 8) and xt.shape == (256, 8) and len(task.losses) == 120
    assert task.test_metrics == evaluate(model, task.test) and task.seed == 0 and task.train_seconds > 0
    assert task.losses[-10:].mean() < task.losses[:10].mean()  # it learned something
    again = train_tiny_transformer(seed=0, vocab=6, length=8, dim=16, heads=4, steps=5, batch_size=64,
                                   num_train=512, num_test=256)
    twice = train_tiny_transformer(seed=0, vocab=6, length=8, dim=16, heads=4, steps=5, batch_size=64,
                                   num_train=512, num_test=256)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), twice.model.state_dict().values()))
    np.testing.assert_array_equal(again.losses, twice.losses)
    assert torch.equal(again.train[0], x)  # the same seeded data set
    with pytest.raises(ValueError, match="batch_size"):
        train_tiny_transformer(steps=1, batch_size=64, num_train=32)


# ----------------------------------------------------------------------------- group-wise quantization
def test_group_options_and_ranges(task):
    assert group_options(task.model) == {"1 per matrix": None, "per head": 4, "half head": 2, "per row": 1}
    # qkv has 3 * 16 rows, out 16, mlp.0 32, mlp.2 16
    assert ranges_per_matrix(task.model, 4) == {"attn.qkv": 12, "attn.out": 4, "mlp.0": 8, "mlp.2": 4}
    assert ranges_per_matrix(task.model, None) == dict.fromkeys(ENCODER, 1)
    assert ranges_per_matrix(task.model, 1) == {"attn.qkv": 48, "attn.out": 16, "mlp.0": 32, "mlp.2": 16}
    two_dim_heads = hk.models.TinyTransformer(vocab=4, dim=8, heads=4)
    assert list(group_options(two_dim_heads)) == ["1 per matrix", "per head", "per row"]  # no half of 2 rows
    for bad in (3, 0, -4, True, 2.0):
        with pytest.raises(ValueError, match="group_size"):
            ranges_per_matrix(task.model, bad)


@pytest.mark.parametrize("group_size", [None, 4, 2, 1])
def test_quantize_transformer_against_the_reference(task, group_size):
    model = task.model
    snap = snapshot(model)
    bits = {"attn.qkv": 2, "attn.out": 3, "mlp.0": 4, "mlp.2": 2}
    q = quantize_transformer(model, bits, group_size, outer_bits=8)
    assert_untouched(model, snap)
    layers, qlayers = dict(model.named_modules()), dict(q.named_modules())
    for name in ENCODER:
        torch.testing.assert_close(qlayers[name].weight.double(), reference_rows(layers[name].weight, bits[name],
                                                                                 group_size), rtol=0, atol=1e-6)
    for name in ("embed", "head"):  # 8 bits, one range each
        torch.testing.assert_close(qlayers[name].weight.double(), reference_rows(layers[name].weight, 8, None),
                                   rtol=0, atol=1e-6)
    quantized = {name + ".weight" for name in (*ENCODER, "embed", "head")}
    for name, p in model.named_parameters():
        if name not in quantized:  # positions, biases and LayerNorms stay float
            assert torch.equal(p, dict(q.named_parameters())[name]), name
    floating = quantize_transformer(model, 3, group_size, outer_bits=None)
    assert torch.equal(floating.embed.weight, model.embed.weight)
    assert torch.equal(floating.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="unknown matrices"):
        quantize_transformer(model, {"attn.qkv": 2, "embed": 4})


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 4, 1])
def test_transformer_size_by_hand(group_size, symmetric):
    # vocab 5, dim 8, 2 heads, length 6, mlp_ratio 2: block matrices qkv 24x8, out 8x8, mlp.0 16x8, mlp.2 8x16
    model = hk.models.TinyTransformer(vocab=5, dim=8, heads=2, max_length=6, mlp_ratio=2)
    bits = {"attn.qkv": 3, "attn.out": 2, "mlp.0": 2, "mlp.2": 4}
    numel = {"attn.qkv": 192, "attn.out": 64, "mlp.0": 128, "mlp.2": 128}
    rows = {"attn.qkv": 24, "attn.out": 8, "mlp.0": 16, "mlp.2": 8}
    groups = {n: 1 if group_size is None else rows[n] // group_size for n in ENCODER}
    size = transformer_size(model, bits, group_size, outer_bits=8, symmetric=symmetric)
    assert size.encoder_weight_bits == 192 * 3 + 64 * 2 + 128 * 2 + 128 * 4
    assert size.encoder_weights == 512
    assert size.encoder_scale_bits == sum(groups[n] * (16 + (0 if symmetric else bits[n])) for n in ENCODER)
    # embedding 5x8 and head 5x8 at 8 bits, one range each
    assert size.outer_bits == 80 * 8 + 2 * (16 + (0 if symmetric else 8))
    # positions 6x8, biases 24 + 8 + 16 + 8 + 5, three LayerNorms of 8 + 8
    assert size.float_bits == (48 + 61 + 48) * 32
    total_params = sum(p.numel() for p in model.parameters())
    assert total_params == 512 + 80 + 157 and size.float32_bits == total_params * 32
    assert size.total_bits == (size.encoder_weight_bits + size.encoder_scale_bits + size.outer_bits
                               + size.float_bits)
    assert size.encoder_bits_per_weight == pytest.approx((size.encoder_weight_bits + size.encoder_scale_bits) / 512)
    assert size.compression == pytest.approx(total_params * 32 / size.total_bits)
    assert size.kilobytes == pytest.approx(size.total_bits / 8192)
    no_outer = transformer_size(model, bits, group_size, outer_bits=None, symmetric=symmetric)
    assert no_outer.outer_bits == 0 and no_outer.float_bits == (157 + 80) * 32


def test_group_sweep(task):
    model = task.model
    snap = snapshot(model)
    options = group_options(model)
    sweep = group_sweep(model, task.test, [2, 8], list(options.values()))
    assert_untouched(model, snap)
    assert sweep.labels == list(options) and sweep.qkv_ranges.tolist() == [1, 12, 24, 48]
    assert sweep.accuracy.shape == (2, 4) and sweep.fp_accuracy == task.test_metrics.accuracy
    for i, b in enumerate(sweep.bits):
        for j, g in enumerate(sweep.group_sizes):
            assert sweep.accuracy[i, j] == evaluate(quantize_transformer(model, b, g), task.test).accuracy
            G = sum(ranges_per_matrix(model, g).values())
            n = sum(dict(model.named_modules())[m].weight.numel() for m in ENCODER)
            assert sweep.bits_per_weight()[i, j] == pytest.approx(b + 16 * G / n)
    fp = task.test_metrics.accuracy
    assert (np.abs(sweep.accuracy[1] - fp) <= 0.02).all()  # 8 bits: rounding costs almost nothing
    with pytest.raises(ValueError, match="bits_list"):
        group_sweep(model, task.test, [], [None])


# ----------------------------------------------------------------------------- mixed precision
def test_mixed_precision_enumerates_every_configuration(task):
    model = task.model
    mp = mixed_precision(model, task.test, low=2, high=3, group_size=4)
    assert len(mp.configs) == 16 and len({tuple(c.values()) for c in mp.configs}) == 16
    assert {tuple(c.values()) for c in mp.configs} == set(itertools.product((2, 3), repeat=4))
    config = {"attn.qkv": 3, "attn.out": 2, "mlp.0": 3, "mlp.2": 2}
    c = mp.index(config)
    assert mp.accuracy[c] == evaluate(quantize_transformer(model, config, 4), task.test).accuracy
    assert mp.bits_per_weight[c] == pytest.approx(transformer_size(model, config, 4).encoder_bits_per_weight)
    order = ["mlp.0", "attn.qkv", "mlp.2", "attn.out"]
    path = mp.path(order)
    assert len(path) == 5
    assert mp.configs[path[0]] == dict.fromkeys(ENCODER, 2) and mp.configs[path[-1]] == dict.fromkeys(ENCODER, 3)
    assert mp.configs[path[2]] == {"attn.qkv": 3, "attn.out": 2, "mlp.0": 3, "mlp.2": 2}
    assert (np.diff(mp.bits_per_weight[path]) > 0).all()
    with pytest.raises(ValueError, match="order"):
        mp.path(["attn.qkv", "mlp.0"])
    with pytest.raises(ValueError, match="low, high"):
        mixed_precision(model, task.test, low=3, high=3)


# ----------------------------------------------------------------------------- quantization-aware fine-tuning
def test_qat_finetune(task):
    model = task.model
    snap = snapshot(model)
    none = qat_finetune(model, task.train, task.test, 2, 4, steps=0)
    assert none.steps.tolist() == [0] and len(none.losses) == 0
    assert none.accuracy[0] == evaluate(quantize_transformer(model, 2, 4), task.test).accuracy
    x = task.test[0][:32]
    with torch.no_grad():  # without steps, the frozen QAT model is the round-to-nearest model
        torch.testing.assert_close(none.model(x), quantize_transformer(model, 2, 4)(x), rtol=0, atol=0)
    run = qat_finetune(model, task.train, task.test, 2, 4, steps=40, lr=3e-3, batch_size=64, eval_every=15, seed=0)
    assert_untouched(model, snap)
    assert run.steps.tolist() == [0, 15, 30, 40] and len(run.losses) == 40 and run.lr == 3e-3
    assert run.final_accuracy == evaluate(run.model, task.test).accuracy
    assert run.losses[-10:].mean() < run.losses[:10].mean()  # the quantized model's training loss falls
    layers = dict(run.model.named_modules())
    for name in ENCODER:  # the result is on its 2-bit per-head grid, embedding and head on 8-bit grids
        w = layers[name].weight
        assert torch.equal(w, hk.quant.fake_quantize(w, 2, True, granularity="rows", group_size=4))
    for name in ("embed", "head"):  # symmetric grids, one range each (Q-BERT's, the experiment's default)
        assert torch.equal(layers[name].weight, hk.quant.fake_quantize(layers[name].weight, 8, True, "tensor"))
    frozen = qat_finetune(model, task.train, task.test, {"attn.qkv": 3, "mlp.0": 2}, None, steps=3, lr=0.0)
    assert (frozen.accuracy == frozen.accuracy[0]).all()  # lr 0: the weights never move
    assert frozen.bits == {"attn.qkv": 3, "mlp.0": 2}
    with pytest.raises(ValueError, match="steps"):
        qat_finetune(model, task.train, task.test, 2, steps=-1)


def test_training_and_qat_report_every_step(task, progress_to):
    calls = []
    progress_to(lambda done, total, what="": calls.append((done, total, what)))
    short = train_tiny_transformer(seed=0, vocab=6, length=8, dim=16, heads=4, steps=4, batch_size=64,
                                   num_train=512, num_test=256)
    assert calls == [(t, 4, "training step") for t in range(1, 5)] and np.isfinite(short.losses).all()
    calls.clear()
    run = qat_finetune(task.model, task.train, task.test, 2, 4, steps=5, batch_size=64, eval_every=2)
    assert calls == [(t, 5, "QAT step") for t in range(1, 6)] and run.steps.tolist() == [0, 2, 4, 5]
