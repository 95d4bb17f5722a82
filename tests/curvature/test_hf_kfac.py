"""K-FAC and MKOR (hk.kfac_factors, hk.KroneckerOperator, hk.optim.KFAC, hk.optim.MKOR) on Hugging Face
transformers built from small configs (random weights, nothing downloaded): GPT-2's Conv1D as the
nn.Linear it is, tied weights, the factor-size guard, the true Fisher from ModelOutputs and
sequence logits, which layers are preconditioned (embeddings, fused qkv, LayerNorm), training with
only the required arguments, and models left as they were."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesskit as hk
from hesskit.curvature.kfac import DEFAULT_MAX_FACTOR_SIZE

import transformers  # noqa: E402
from hf_zoo import VOCAB, assert_unchanged, bert, gpt2, linear_twin, snapshot, token_batches  # noqa: E402

DT = torch.float64
FALLBACK = "ignore:.*fallback step:UserWarning"
CONV1D = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def untied(model):
    """GPT-2 with its own lm_head weight (a copy of the embedding it was tied to)."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def small_gpt2(dtype=torch.float32, tied=True):
    torch.manual_seed(0)
    model = gpt2(hidden=16, layers=2).to(dtype)
    return model if tied else untied(model)


def small_bert(dtype=torch.float32):
    torch.manual_seed(0)
    return bert(hidden=16, layers=2).to(dtype)


def lm_loss(logits, labels):
    """The shifted token cross-entropy on flattened logits, as a user writes it (padding is -100)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def lm_batch(size=8, seed=1):
    (inputs, labels), = token_batches(sizes=(size,), seed=seed)
    return inputs, labels


def classifier_batch(size=8, seed=1):
    (inputs, labels), = token_batches(sizes=(size,), seed=seed, classes=3)
    return inputs, labels


def closure_for(opt, model, inputs, labels, criterion, outputs=False):
    def closure():
        opt.zero_grad()
        out = model(**inputs)  # a ModelOutput
        loss = criterion(out.logits, labels)
        return (loss, out) if outputs else loss
    return closure


def matrix(model, name):
    """The (out, in) weight of a Linear or Conv1D layer."""
    return hk.layers.linear_weight(model.get_submodule(name)).detach()


def largest_factor(opt):
    """The most rows of any dense (square) factor, eigenbasis or inverse factor an optimizer keeps."""
    keys = ("A", "G", "QA", "QG", "A_inv", "G_inv")
    return max(t.shape[0] for s in opt.state.values() for k, t in s.items() if k in keys and t is not None
               and t.dim() == 2)


# --------------------------------------------------------------------------- Conv1D is a linear layer
@pytest.mark.filterwarnings(FALLBACK)
def test_conv1d_factors_and_steps_equal_the_linear_twin():
    """Factors of every Conv1D are those of the equivalent nn.Linear (on its (out, in) view), and
    K-FAC and MKOR steps write the same update back into the transposed storage (float64)."""
    model = small_gpt2(DT, tied=False)
    twin = linear_twin(model)
    inputs, labels = lm_batch()
    factors = hk.kfac_factors(model, lm_loss, (inputs, labels))
    expected = hk.kfac_factors(twin, lm_loss, (inputs, labels))
    assert factors.keys() == expected.keys()
    assert all(f"transformer.h.{i}.{c}" in factors for i in range(2) for c in CONV1D)
    for name, f in factors.items():
        torch.testing.assert_close(f.A, expected[name].A, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(f.G, expected[name].G, rtol=0, atol=1e-12, msg=name)
        assert f.weight_shape == expected[name].weight_shape and f.has_bias == expected[name].has_bias
    assert factors["transformer.h.0.attn.c_attn"].weight_shape == (48, 16)  # fused q, k, v: one matrix
    for make in (lambda m: hk.optim.KFAC(m, factor_every=1, inverse_every=2), hk.optim.MKOR):
        a, b = copy.deepcopy(model), copy.deepcopy(twin)
        opt_a, opt_b = make(a), make(b)
        for _ in range(3):
            opt_a.step(closure_for(opt_a, a, inputs, labels, lm_loss))
            opt_b.step(closure_for(opt_b, b, inputs, labels, lm_loss))
        for i in range(2):
            for c in CONV1D:
                name = f"transformer.h.{i}.{c}"
                assert not torch.equal(matrix(a, name), matrix(model, name))
                torch.testing.assert_close(matrix(a, name), matrix(b, name), rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(a.lm_head.weight, b.lm_head.weight, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- tied weights
def test_a_tied_weight_is_not_preconditioned_as_one_layer():
    """GPT-2's lm_head.weight is transformer.wte.weight: neither module is Kronecker-factored, both
    are named with the module they are tied with, and the weight takes the SGD fallback step on
    its whole gradient (head and embedding contributions)."""
    model = small_gpt2(DT)
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs, labels = lm_batch()
    with pytest.warns(UserWarning, match="fallback step") as record:
        opt = hk.optim.KFAC(model, lr=0.1, momentum=0.0, factor_every=1)
    message = str(record[0].message)
    assert "lm_head (Linear, tied with transformer.wte)" in message
    assert "transformer.wte (Embedding, tied with lm_head)" in message
    assert {"lm_head", "transformer.wte"} <= set(opt.fallback_layers)
    assert "transformer.wpe" not in opt.fallback_layers  # the other embedding is preconditioned
    weight = model.lm_head.weight.detach().clone()
    gradient = torch.autograd.grad(lm_loss(model(**inputs).logits, labels), model.lm_head.weight)[0]
    opt.step(closure_for(opt, model, inputs, labels, lm_loss))
    torch.testing.assert_close(model.lm_head.weight, weight - 0.1 * gradient, rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match=r"no factors: .*lm_head \(Linear, tied with transformer.wte\)"):
        factors = hk.kfac_factors(model, lm_loss, (inputs, labels))
    assert "lm_head" not in factors and "transformer.wte" not in factors and "transformer.wpe" in factors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert {"lm_head", "transformer.wte"} <= set(hk.kfac_factors(untied(model), lm_loss, (inputs, labels)))


# --------------------------------------------------------------------------- the size guard
def test_factors_above_max_factor_size_are_not_built():
    """Hidden size 16, vocabulary 24, limit 20: c_attn (G 48), c_fc (G 64), the MLP's c_proj (A 65,
    with the bias) and lm_head (G 24) fall back, named with the size; attn.c_proj (17 and 16) and
    the embeddings (G 16, diagonal A) keep their factors."""
    model = small_gpt2(tied=False)
    inputs, labels = lm_batch()
    for make in (lambda m: hk.optim.KFAC(m, max_factor_size=20), lambda m: hk.optim.MKOR(m, max_factor_size=20)):
        with pytest.warns(UserWarning, match="fallback step") as record:
            opt = make(copy.deepcopy(model))
        message = str(record[0].message)
        assert "h.0.attn.c_attn (Conv1D, its factor G would be 48 x 48, above max_factor_size=20)" in message
        assert "h.0.mlp.c_fc (Conv1D, its factor G would be 64 x 64, above max_factor_size=20)" in message
        assert "h.0.mlp.c_proj (Conv1D, its factor A would be 65 x 65, above max_factor_size=20)" in message
        assert "lm_head (Linear, its factor G would be 24 x 24, above max_factor_size=20)" in message
        assert "transformer.h.0.attn.c_proj" not in opt.fallback_layers
        opt.step(closure_for(opt, opt.model, inputs, labels, lm_loss))
        assert largest_factor(opt) == 17
    with pytest.warns(UserWarning, match=r"c_fc \(Conv1D, its factor G would be 64 x 64"):
        factors = hk.kfac_factors(model, lm_loss, (inputs, labels), max_factor_size=20)
    assert sorted(factors) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj", "transformer.wpe",
                               "transformer.wte"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no limit: every layer has factors, nothing to warn about
        assert len(hk.kfac_factors(model, lm_loss, (inputs, labels), max_factor_size=None)) == 11


def test_the_default_limit_keeps_a_vocabulary_square_factor_out():
    """An LM head whose vocabulary is one above DEFAULT_MAX_FACTOR_SIZE falls back; its embedding
    (diagonal A, G of the hidden size) is still preconditioned, and a step builds no factor above the limit."""
    assert DEFAULT_MAX_FACTOR_SIZE == 8192
    vocab = DEFAULT_MAX_FACTOR_SIZE + 1
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=8, n_layer=1, n_head=2, n_positions=8, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.warns(UserWarning, match=f"lm_head \\(Linear, its factor G would be {vocab} x {vocab}, above "
                                         f"max_factor_size={DEFAULT_MAX_FACTOR_SIZE}\\)"):
        opt = hk.optim.KFAC(model)
    assert "transformer.wte" not in opt.fallback_layers
    opt.step(closure_for(opt, model, inputs, ids, lm_loss))
    assert opt.state[model.transformer.wte.weight]["A"].shape == (vocab,)  # a vector, not vocab x vocab
    assert largest_factor(opt) == 33  # the MLP's c_proj: 32 inputs and the bias


# --------------------------------------------------------------------------- the true Fisher
@pytest.mark.filterwarnings(FALLBACK)
@pytest.mark.parametrize("cls", [hk.optim.KFAC, hk.optim.MKOR])
@pytest.mark.parametrize("task", ["gpt2", "bert"])
def test_mc_fisher_takes_model_outputs_and_sequence_logits(cls, task):
    """fisher="mc" samples labels from the logits of the ModelOutput the closure returns ((B, T, V)
    for the LM): restorable from the seed, and different from the empirical Fisher's steps."""
    make = small_gpt2 if task == "gpt2" else small_bert
    inputs, labels = lm_batch() if task == "gpt2" else classifier_batch()
    criterion = lm_loss if task == "gpt2" else F.cross_entropy
    runs = []
    for fisher, seed in (("mc", 3), ("mc", 3), ("empirical", 3)):
        model = make()
        opt = cls(model, fisher=fisher, seed=seed)
        for _ in range(3):
            opt.step(closure_for(opt, model, inputs, labels, criterion, outputs=fisher == "mc"))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.isfinite(runs[0]).all()


@pytest.mark.filterwarnings(FALLBACK)
def test_mc_factors_of_a_language_model_with_dict_inputs():
    model = small_gpt2(tied=False)
    inputs, labels = lm_batch()
    empirical = hk.kfac_factors(model, lm_loss, (inputs, labels))
    mc = hk.kfac_factors(model, lm_loss, (inputs, labels), fisher="mc", seed=0)
    assert mc.keys() == empirical.keys()
    for name, f in mc.items():
        torch.testing.assert_close(f.A, empirical[name].A)  # the same inputs
        assert torch.isfinite(f.G).all() and not torch.equal(f.G, empirical[name].G)


def test_mc_factors_of_sequence_logits_approach_the_ggn_block():
    """A linear layer applied to T identical positions of one sequence, token cross-entropy
    averaged over the positions: the GGN block is a a^T (x) H, H = diag(p) - p p^T. With labels
    sampled at every position, G is a mean of T iid (p - e_y)(p - e_y)^T (each prediction counts
    as a term of the loss): every entry within 5 sd / sqrt(T) of H (per sequence instead, G would
    be H / T)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).to(DT)
    T = 4000
    a = torch.randn(1, 3, generator=torch.Generator().manual_seed(6), dtype=DT)
    x, y = a.expand(T, 3).reshape(1, T, 3).clone(), torch.zeros(1, T, dtype=torch.long)
    criterion = hk.SequenceCrossEntropy()
    f = hk.kfac_factors(model, criterion, (x, y), fisher="mc", seed=0)["0"]
    abar = torch.cat([a, torch.ones(1, 1, dtype=DT)], dim=1)
    torch.testing.assert_close(f.A, abar.T @ abar, rtol=0, atol=1e-12)
    with torch.no_grad():
        p = torch.softmax(model(a), dim=-1)[0]
    H = torch.diag(p) - torch.outer(p, p)
    outer = torch.stack([torch.outer(p - e, p - e) for e in torch.eye(4, dtype=DT)])
    sd = ((p[:, None, None] * outer**2).sum(0) - H**2).clamp(min=0).sqrt()
    assert ((f.G - H).abs() <= 5 * sd / math.sqrt(T) + 1e-12).all()
    ggn = hk.GGNOperator(model, criterion, (x, y)).dense()
    torch.testing.assert_close(ggn, hk.KroneckerOperator(abar.T @ abar, H, (4, 3), True).dense(), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- which layers
def test_embedding_factors_are_diagonal_and_exact_for_one_token():
    """An Embedding is the linear layer of one-hot inputs: A is the vector of token frequencies,
    and for one token A (x) G is that sample's Fisher block (weight stored (vocab, dim): the
    factor's order is its (dim, vocab) transpose)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).to(DT)
    tokens, y = torch.tensor([[2]]), torch.tensor([1])
    f = hk.kfac_factors(model, nn.CrossEntropyLoss(), (tokens, y))["0"]
    assert f.A.shape == (5,) and torch.equal(f.A, torch.eye(5, dtype=DT)[2]) and f.weight_shape == (3, 5)
    block = hk.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (tokens, y), params=["0.weight"]).dense()
    order = torch.arange(15).reshape(5, 3).T.reshape(-1)  # (dim, vocab) row-major -> stored (vocab, dim) row-major
    torch.testing.assert_close(f.dense(), block[order][:, order], rtol=0, atol=1e-12)
    tokens = torch.tensor([[0, 2, 2], [4, 2, 0]])
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 4)).to(DT)
    f = hk.kfac_factors(model, nn.CrossEntropyLoss(), (tokens, torch.tensor([1, 3])))["0"]
    torch.testing.assert_close(f.A, torch.tensor([2, 0, 3, 0, 1], dtype=DT) / 6, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls", [hk.optim.KFAC, hk.optim.MKOR])
def test_which_layers_are_preconditioned(cls):
    """Linear and Conv1D layers (GPT-2's fused qkv c_attn as one matrix) are; embeddings by K-FAC
    only (diagonal A); LayerNorm never (elementwise parameters: nothing to factor)."""
    embeddings = ["transformer.wpe", "transformer.wte"]
    norms = ["transformer.ln_f"] + [f"transformer.h.{i}.{n}" for i in range(2) for n in ("ln_1", "ln_2")]
    model = small_gpt2(tied=False)
    with pytest.warns(UserWarning, match="fallback step"):
        opt = cls(model)
    assert opt.fallback_layers == sorted(norms + (embeddings if cls is hk.optim.MKOR else []))
    inputs, labels = lm_batch()
    opt.step(closure_for(opt, model, inputs, labels, lm_loss))
    a, g = ("A", "G") if cls is hk.optim.KFAC else ("A_inv", "G_inv")
    fused = opt.state[model.transformer.h[1].attn.c_attn.weight]
    assert fused[a].shape == (17, 17) and fused[g].shape == (48, 48)  # 16 inputs and the bias; q, k and v rows
    norms = ["bert.embeddings.LayerNorm"] + [f"bert.encoder.layer.{i}.{n}.LayerNorm" for i in range(2)
                                             for n in ("attention.output", "output")]
    embeddings = [f"bert.embeddings.{n}_embeddings" for n in ("word", "position", "token_type")]
    with pytest.warns(UserWarning, match="fallback step") as record:
        opt = cls(small_bert())
    assert opt.fallback_layers == sorted(norms + (embeddings if cls is hk.optim.MKOR else []))
    assert "bert.embeddings.LayerNorm (LayerNorm)" in str(record[0].message)


# --------------------------------------------------------------------------- training with the defaults
@pytest.mark.filterwarnings(FALLBACK)
@pytest.mark.parametrize("cls, bound", [(hk.optim.KFAC, 0.5), (hk.optim.MKOR, 0.97)])
@pytest.mark.parametrize("task", ["gpt2", "bert"])
def test_defaults_lower_the_loss_and_leave_the_model_as_it_was(cls, bound, task):
    """25 steps with only the required arguments on a GPT-2-style LM (dict inputs, shifted labels,
    cross-entropy on flattened logits) and a BERT classifier. Final / initial loss over six seeds
    measured: BERT, K-FAC 1.3-3.5 with the old damping 1e-3, 0.00-0.22 with 1e-2, MKOR 0.16-0.92;
    GPT-2, K-FAC 0.14-0.22, MKOR 0.32-0.44. The model keeps its mode, requires_grad flags (a
    frozen embedding stays as it was) and no hooks."""
    model = small_gpt2() if task == "gpt2" else small_bert()
    inputs, labels = lm_batch() if task == "gpt2" else classifier_batch()
    criterion = lm_loss if task == "gpt2" else F.cross_entropy
    if task == "gpt2":  # dropout is 0: train mode is deterministic too; a frozen embedding stays frozen
        model.train()
        model.transformer.wpe.weight.requires_grad_(False)
    else:
        model.eval()
    before = snapshot(model)
    opt = cls(model)

    def loss():
        with torch.no_grad():
            return criterion(model(**inputs).logits, labels).item()

    start = loss()
    for _ in range(25):
        opt.step(closure_for(opt, model, inputs, labels, criterion))
    assert loss() < bound * start, (start, loss())
    assert [m.training for m in model.modules()] == before["modes"]
    assert [p.requires_grad for p in model.parameters()] == before["flags"]
    assert not any(m._forward_hooks for m in model.modules())
    if task == "gpt2":
        assert torch.equal(model.transformer.wpe.weight, before["state"]["transformer.wpe.weight"])


@pytest.mark.filterwarnings(FALLBACK)
@pytest.mark.parametrize("task", ["gpt2", "bert"])
def test_kfac_factors_leave_the_model_as_it_was(task):
    model = (small_gpt2(tied=False) if task == "gpt2" else small_bert()).train()
    inputs, labels = lm_batch() if task == "gpt2" else classifier_batch()
    criterion = lm_loss if task == "gpt2" else F.cross_entropy
    second = lm_batch(4, seed=2) if task == "gpt2" else classifier_batch(4, seed=2)
    before = snapshot(model)
    for fisher in ("empirical", "mc"):
        factors = hk.kfac_factors(model, criterion, [(inputs, labels), second], fisher=fisher, seed=0)
        assert factors and all(torch.isfinite(f.G).all() for f in factors.values())
    assert_unchanged(model, before)
    assert not any(m._forward_hooks for m in model.modules())


def test_fallback_warning_names_every_reason_once():
    """One warning, each module once, its reason in parentheses."""
    with pytest.warns(UserWarning, match="fallback step") as record:
        hk.optim.KFAC(small_gpt2(), max_factor_size=40)
    message = str(record[0].message)
    names = re.findall(r"([\w.]+) \(", message.split(": ", 1)[1])
    assert len(names) == len(set(names)) and "lm_head" in names and "transformer.h.0.attn.c_attn" in names
    assert len([w for w in record if "fallback step" in str(w.message)]) == 1


@pytest.mark.filterwarnings(FALLBACK)
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_state_dict_round_trip_with_embedding_factors(fisher):
    """An Embedding's state (a vector A, no eigenbasis) survives state_dict: a restored K-FAC
    continues bit-identically on a BERT classifier."""
    batches = [classifier_batch(size=4, seed=s) for s in range(6)]

    def train(opt, model, part):
        for inputs, labels in part:
            opt.step(closure_for(opt, model, inputs, labels, F.cross_entropy, outputs=True))

    def make(model):
        return hk.optim.KFAC(model, factor_every=2, inverse_every=3, fisher=fisher)

    model = small_bert()
    opt = make(model)
    train(opt, model, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(opt, model, batches[3:])
    restored = small_bert()
    restored.load_state_dict(saved_model)
    opt2 = make(restored)
    opt2.load_state_dict(saved_opt)
    assert opt2.state[restored.bert.embeddings.word_embeddings.weight]["A"].shape == (VOCAB,)
    train(opt2, restored, batches[3:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), restored.parameters()))


def test_kronecker_operators_multiply_as_their_dense_blocks():
    """`KroneckerOperator @ V` (G M A, no block formed) equals `dense() @ V` for every layer kind of a
    GPT-2 from a small config, with dict inputs and the defaults: Conv1D with bias, the tied Embedding
    (A kept as its diagonal) and a Linear without bias (the untied lm_head)."""
    inputs, labels = lm_batch()
    factors = hk.kfac_factors(small_gpt2(torch.float64, tied=False), lm_loss, (inputs, labels))
    kinds = {(f.has_bias, f.A.dim()) for f in factors.values()}
    assert {(True, 2), (False, 1), (False, 2)} <= kinds
    for name, f in factors.items():
        assert isinstance(f, hk.MatrixFreeOperator) and f.shape == (f.num_params, f.num_params)
        V = torch.randn(f.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(f @ V, f.dense() @ V, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(f @ V[:, 0], f.dense() @ V[:, 0], rtol=1e-10, atol=1e-12, msg=name)
