"""Hugging Face BERT, GPT-2 and Llama models (small configs, default SDPA attention, dict inputs
with padding) through every curvature operator and estimator, in float64, against finite
differences (Hessian), an explicit J^T H J (GGN) and single-sample gradients (EF)."""

from __future__ import annotations

import warnings

import pytest
import reference as ref
import torch
from hf_zoo import assert_unchanged, bert, gpt2, llama, make_hf_case, same_weights, snapshot, token_batches
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesskit as hk
from torch.func import functional_call

MODELS = ["bert", "gpt2", "llama"]


def _close(a, b, rtol=1e-10):
    scale = max(b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


def mean_loss(case, theta):
    """(1/N) sum_b N_b criterion(f(x_b), y_b) with the trainable parameters set to theta (plain autograd)."""
    weights = ref.unflatten(case.model, case.names, theta)
    total = sum(len(y) for _, y in case.batches)
    return sum(len(y) / total * case.criterion(functional_call(case.model, weights, (), dict(x)).logits, y) for x, y in case.batches)


def gradient(case, theta):
    theta = theta.detach().requires_grad_()
    return torch.autograd.grad(mean_loss(case, theta), theta)[0]


def columns(case, count=4):
    n = case.num_params
    return [0, n // 3, n // 2, n - 1][:count]


@pytest.mark.parametrize("name", MODELS)
def test_hessian_on_sdpa_model_matches_finite_differences(name):
    case = make_hf_case(name)
    assert case.model.config._attn_implementation == "sdpa"
    before = snapshot(case.model)
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    cols = columns(case)
    E = torch.eye(case.num_params, dtype=torch.float64)[:, cols]
    HE = op @ E
    theta, eps = ref.flat(case.model, case.names), 1e-5
    for j, i in enumerate(cols):
        e = torch.zeros_like(theta)
        e[i] = eps
        fd = (gradient(case, theta + e) - gradient(case, theta - e)) / (2 * eps)
        _close(HE[:, j], fd, rtol=1e-6)
    assert_unchanged(case.model, before)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("name", MODELS)
def test_sdpa_products_equal_eager_products(name, kind):
    case = make_hf_case(name)
    eager = same_weights(case.model, make_hf_case(name, attn="eager").model)
    assert eager.config._attn_implementation == "eager"
    cls = {"hessian": hk.HessianOperator, "ggn": hk.GGNOperator, "empirical_fisher": hk.EmpiricalFisherOperator}[kind]
    V = torch.randn(case.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if name == "llama":  # Llama's eager attention takes its softmax in float32 by design: hesskit says so
        with pytest.warns(UserWarning, match=r"LlamaAttention.*softmax"):
            eager_product = cls(eager, case.criterion, case.batches) @ V
        _close(cls(case.model, case.criterion, case.batches) @ V, eager_product, rtol=1e-6)
        return
    _close(cls(case.model, case.criterion, case.batches) @ V, cls(eager, case.criterion, case.batches) @ V)


def _jacobian(case, x):
    theta = ref.flat(case.model, case.names).requires_grad_()
    out = functional_call(case.model, ref.unflatten(case.model, case.names, theta), (), dict(x)).logits
    rows = [torch.autograd.grad(o, theta, retain_graph=True)[0] for o in out.reshape(-1)]
    return out.detach(), torch.stack(rows)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_ggn_matches_explicit_jacobian_product(name):
    case = make_hf_case(name)
    total = sum(len(y) for _, y in case.batches)
    V = torch.randn(case.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = 0
    for x, y in case.batches:
        out, J = _jacobian(case, x)
        H = ref.output_hessian(case.criterion, out, y)
        expected = expected + len(y) / total * J.T @ (H @ (J @ V))
    _close(hk.GGNOperator(case.model, case.criterion, case.batches) @ V, expected)
    # the same through loss_fn returning (loss, outputs), and through an explicit output_fn

    def loss_fn(model, batch):
        out = model(**batch[0])
        return case.criterion(out.logits, batch[1]), out

    _close(hk.GGNOperator(case.model, data=case.batches, loss_fn=loss_fn) @ V, expected)
    for batched in (False, True):  # a graph built for one product is freed by its last use
        _close(hk.GGNOperator(case.model, data=case.batches, loss_fn=loss_fn, cache_memory=0,
                              batched_products=batched) @ V, expected)
        _close(hk.GGNOperator(case.model, case.criterion, case.batches, cache_memory=0,
                              batched_products=batched) @ V, expected)
    _close(hk.GGNOperator(case.model, case.criterion, case.batches, output_fn=lambda out: out[0]) @ V, expected)


@pytest.mark.parametrize("name", MODELS)
def test_empirical_fisher_counts_sequences_as_samples(name):
    case = make_hf_case(name)
    theta = ref.flat(case.model, case.names)
    rows = []
    for x, y in case.batches:  # one sample = one sequence: its own loss, padding ignored
        for i in range(len(y)):
            one = ({k: v[i : i + 1] for k, v in x.items()}, y[i : i + 1])
            single = type(case)(case.name, case.model, case.criterion, [one])
            rows.append(gradient(single, theta))
    G = torch.stack(rows)
    op = hk.EmpiricalFisherOperator(case.model, case.criterion, case.batches)
    _close(op.per_sample_gradients(), G)
    V = torch.randn(case.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _close(op @ V, G.T @ (G @ V) / len(G))


def test_exact_ggn_diagonal_on_a_classifier_with_dict_inputs():
    case = make_hf_case("bert")
    op = hk.GGNOperator(case.model, case.criterion, case.batches)
    eye = torch.eye(case.num_params, dtype=torch.float64)
    diag = torch.cat([(eye[:, i : i + 64] * (op @ eye[:, i : i + 64])).sum(0) for i in range(0, case.num_params, 64)])
    _close(op.exact_diagonal(), diag, rtol=1e-9)


def test_empirical_fisher_with_loss_fn_falls_back_to_a_loop_where_vmap_cannot_run():
    case = make_hf_case("bert")

    def loss_fn(model, batch):  # HF's own labels= loss; .item() defeats vmap
        x, y = batch
        if float(y.float().sum().item()) < -1:
            raise AssertionError
        return nn.functional.cross_entropy(model(**x).logits, y)

    expected = hk.EmpiricalFisherOperator(case.model, case.criterion, case.batches).per_sample_gradients()
    with pytest.warns(UserWarning, match="loop over samples"):
        got = hk.EmpiricalFisherOperator(case.model, data=case.batches, loss_fn=loss_fn).per_sample_gradients()
    _close(got, expected)


def test_gru_classifier_per_sample_gradients():
    class GRUClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    torch.manual_seed(0)
    model = GRUClassifier().double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G = hk.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y)).per_sample_gradients()
    for i in range(5):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        _close(G[i], g)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_estimators_on_sdpa_language_models(name):
    case = make_hf_case(name)
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    H = op.dense()
    exact = torch.linalg.eigvalsh(H)
    top = hk.eigenvalues(op, k=2, tol=1e-8, seed=0)
    assert top.converged.all()
    assert ((top.values - exact.flip(0)[:2]).abs() <= top.residuals + 1e-10).all()  # the residual bounds the error
    tr = hk.trace(op, num_matvecs=60, seed=0)
    assert abs(tr.value - H.trace().item()) < 5 * tr.stderr
    assert tr.params == top.params == tuple(op.param_names)  # results carry what they touched
    name, block = next(op.blocks())
    assert hk.trace(block, num_matvecs=4, seed=0).params == tuple(block.param_names)
    assert hk.trace(H, num_matvecs=4, seed=0).params is None
    density = hk.spectral_density(op, seed=0)
    assert density.num_matvecs > 0


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_xtrace_xdiag_block_traces_and_smallest_eigenvalues_on_hf_models(name):
    """Dict inputs, default SDPA attention, only the required arguments: with 2n products XTrace's
    sketch spans everything, so trace, diagonal and every layer's trace are exact; the smallest
    eigenvalues come from block Lanczos (the default there); the default cache budget holds both
    batches and gives the same products as no cache."""
    case = make_hf_case(name)
    before = snapshot(case.model)
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    H = op.dense()
    n, scale = H.shape[0], H.abs().max().item()
    assert abs(hk.trace(op, 2 * n, method="xtrace", seed=0).value - H.trace().item()) < 1e-10 * scale * n
    torch.testing.assert_close(hk.diagonal(op, 2 * n, method="xdiag", seed=0).value, H.diag(), rtol=0,
                               atol=1e-10 * scale)
    blocks = hk.trace(op, 2 * n, method="xtrace", blocks="module", seed=0)
    start = 0
    for block, size in blocks.sizes.items():
        assert abs(blocks[block] - torch.trace(H[start : start + size, start : start + size]).item()) < 1e-10 * scale * n
        start += size
    smallest = hk.eigenvalues(op, k=2, which="smallest", tol=1e-8, seed=0)
    assert smallest.method == "block lanczos (block size 2)" and smallest.converged.all()
    torch.testing.assert_close(smallest.values, torch.linalg.eigvalsh(H)[:2], rtol=0, atol=1e-9 * scale)
    assert op.cached_batches == [0, 1]
    v = torch.randn(n, dtype=H.dtype)
    assert torch.equal(hk.HessianOperator(case.model, case.criterion, case.batches, cache_memory=0) @ v, op @ v)
    assert_unchanged(case.model, before)


def test_tied_parameter_is_found_under_either_name():
    case = make_hf_case("gpt2")
    assert case.model.lm_head.weight is case.model.transformer.wte.weight
    v = torch.randn(case.model.lm_head.weight.numel(), dtype=torch.float64)
    by_head = hk.HessianOperator(case.model, case.criterion, case.batches, params=["lm_head.weight"]) @ v
    by_wte = hk.HessianOperator(case.model, case.criterion, case.batches, params=["transformer.wte.weight"]) @ v
    _close(by_head, by_wte, rtol=0)
    with pytest.raises(ValueError, match="twice"):
        hk.HessianOperator(case.model, case.criterion, case.batches, params=["lm_head.weight", "transformer.wte.weight"])


@pytest.mark.filterwarnings("ignore:.*lower precision")  # the stock Llama's float32 RMSNorm
def test_random_loss_is_refused():
    torch.manual_seed(0)
    model = llama(attention_dropout=0.3).double()  # train mode: dropout inside attention, no nn.Dropout
    assert model.training and not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    batches = token_batches()
    crit = hk.SequenceCrossEntropy(shift=True)
    op = hk.HessianOperator(model, crit, batches)
    with pytest.raises(ValueError, match="random"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    assert torch.equal(hk.HessianOperator(model, crit, batches, mode="eval") @ v,
                       hk.HessianOperator(model.eval(), crit, batches) @ v)
    # an nn.Dropout switched back to train mode inside an eval model
    model = bert(dropout=0.2).double().eval()
    model.bert.encoder.layer[0].output.dropout.train()
    with pytest.raises(ValueError, match="train mode"):
        hk.HessianOperator(model, nn.CrossEntropyLoss(), token_batches(classes=3))


def test_outputs_without_logits_ask_for_output_fn():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    model = TwoHeads().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    op = hk.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(TypeError, match="output_fn"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64)
    op = hk.GGNOperator(model, nn.CrossEntropyLoss(), (x, y), output_fn=lambda out: out[1])
    G = op.dense()
    assert G[:8].abs().max() == 0 and G[8:, 8:].abs().max() > 0  # only head b reaches the loss


def test_float32_computation_inside_a_float64_model_warns():
    case = make_hf_case("llama")
    stock = same_weights(case.model, llama().double().eval())  # RMSNorm upcasts to float32 inside
    op = hk.HessianOperator(stock, case.criterion, case.batches)
    with pytest.warns(UserWarning, match=r"RMSNorm.*lower precision"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = hk.HessianOperator(case.model, case.criterion, case.batches)
        op @ torch.zeros(op.shape[0], dtype=torch.float64)


def test_a_float32_loss_from_a_float64_model_warns():
    case = make_hf_case("bert")
    crit = lambda out, y: nn.functional.cross_entropy(out.float(), y)  # noqa: E731
    op = hk.HessianOperator(case.model, crit, case.batches)
    with pytest.warns(UserWarning, match="float32"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64)


def test_user_attention_setting_is_left_alone():
    case = make_hf_case("gpt2")
    flags = lambda: (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),  # noqa: E731
                     torch.backends.cuda.math_sdp_enabled())
    before = flags()
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert flags() == before
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        inside = flags()
        op.clear_cache()
        op @ torch.ones(op.shape[0], dtype=torch.float64)
        assert flags() == inside


def test_custom_fused_attention_gets_a_clear_error():
    class FusedOnly(nn.Module):  # calls the CPU flash kernel directly, which has no double backward
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            q = self.proj(x).view(x.shape[0], 1, x.shape[1], 4)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0].sum(dim=(1, 2))

    model = FusedOnly()
    x, y = torch.randn(3, 5, 4), torch.randn(3, 4)
    op = hk.HessianOperator(model, nn.MSELoss(), (x, y))
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        op @ torch.ones(op.shape[0])


@pytest.mark.parametrize("layer", ["mha", "encoder"])
def test_torch_attention_modules_hessian(layer):
    torch.manual_seed(0)
    if layer == "mha":
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
                self.head = nn.Linear(4, 2)

            def forward(self, x):
                return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))
        model = Net()
    else:
        model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
                                                    num_layers=1, enable_nested_tensor=False),
                              nn.Flatten(), nn.Linear(20, 2))
    model = model.double().eval()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    names = [n for n, _ in model.named_parameters()]
    H = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).dense()
    cols = [0, H.shape[0] // 2, H.shape[0] - 1]
    fd = ref.finite_difference_hessian_columns(model, names, [(x, y)], nn.CrossEntropyLoss(), cols)
    _close(H[:, cols], fd, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:.*fall back to a loop")
def test_model_comes_back_as_it_was_after_every_operator_and_estimator():
    case = make_hf_case("bert")
    model = case.model.train()  # as Hugging Face constructors return it; mode="eval" is needed
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.classifier.bias.requires_grad_(False)
    before = snapshot(model)
    for cls in (hk.HessianOperator, hk.GGNOperator, hk.EmpiricalFisherOperator):
        op = cls(model, case.criterion, case.batches, mode="eval")
        hk.trace(op, num_matvecs=6, seed=0)
        hk.diagonal(op, num_matvecs=4, seed=0)
        hk.eigenvalues(op, k=1, max_matvecs=30, seed=0)
        hk.spectral_density(op, num_runs=1, num_steps=5, seed=0)
        for _, block in op.blocks():
            block @ torch.ones(block.shape[0], dtype=torch.float64)
            break
        if cls is hk.GGNOperator:
            op.exact_diagonal()
        if cls is hk.EmpiricalFisherOperator:
            op.per_sample_gradients()
        assert_unchanged(model, before)


def test_one_dict_batch_is_one_batch():
    case = make_hf_case("bert")
    (inputs, labels), = token_batches(sizes=(4,), classes=3)
    v = torch.randn(case.num_params, dtype=torch.float64)
    single = hk.HessianOperator(case.model, case.criterion, (inputs, labels)) @ v
    _close(single, hk.HessianOperator(case.model, case.criterion, [(inputs, labels)]) @ v, rtol=0)
    dicts = [dict(inputs, labels=labels), dict(inputs, labels=labels)]  # a list of dicts: two batches
    loss_fn = lambda model, batch: model(**batch).loss  # noqa: E731
    op = hk.HessianOperator(case.model, data=dicts, loss_fn=loss_fn)
    assert [count for count, _ in op.batches] == [4, 4]


@pytest.mark.filterwarnings("ignore:.*fall back to a loop")
def test_exact_ggn_diagonal_on_a_language_model_counts_sequences():
    case = make_hf_case("gpt2")
    batches = token_batches(sizes=(2, 1), pad=False)  # equal lengths: the token mean is the mean of sequence means
    op = hk.GGNOperator(case.model, case.criterion, batches)
    eye = torch.eye(case.num_params, dtype=torch.float64)
    diag = torch.cat([(eye[:, i : i + 128] * (op @ eye[:, i : i + 128])).sum(0) for i in range(0, case.num_params, 128)])
    _close(op.exact_diagonal(), diag, rtol=1e-9)
    with pytest.raises(ValueError, match="padding"):  # a padded token mean is not a mean over sequences
        hk.GGNOperator(case.model, case.criterion, case.batches).exact_diagonal()
