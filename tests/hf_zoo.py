"""Hugging Face models built from small configs (random weights, nothing downloaded), with their
default attention, and batches the way their users make them: dict inputs with padding masks."""

from __future__ import annotations

import copy
import types

import torch
import transformers
from torch import nn

import hesskit as hk
from conftest import Case

VOCAB, LENGTH = 24, 6


HFCase = Case  # the zoo's case: batches here are [({"input_ids", "attention_mask"}, targets)], ragged


def _quiet():
    transformers.logging.set_verbosity_error()


def bert(attn: str = "sdpa", num_labels: int = 3, dropout: float = 0.0, hidden: int = 8, layers: int = 1):
    _quiet()
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2(attn: str = "sdpa", dropout: float = 0.0, hidden: int = 8, layers: int = 1):
    _quiet()
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=2, n_positions=16, resid_pdrop=dropout,
        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config)


def llama(attn: str = "sdpa", attention_dropout: float = 0.0, hidden: int = 8, layers: int = 1):
    _quiet()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, attention_dropout=attention_dropout,
        bos_token_id=0, eos_token_id=0, attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config)


BUILDERS = {"bert": bert, "gpt2": gpt2, "llama": llama}


def token_batches(sizes=(3, 2), seed: int = 0, classes: int | None = None, pad: bool = True) -> list:
    """Ragged batches of dict inputs; the first sequence of each batch is padded at the end.
    Targets: a class per sequence (`classes`), else the input ids with padding set to -100 (LM)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        ids = torch.randint(1, VOCAB, (size, LENGTH), generator=gen)
        mask = torch.ones(size, LENGTH, dtype=torch.long)
        if pad:
            mask[0, LENGTH - 2 :] = 0
        if classes is not None:
            targets = torch.randint(0, classes, (size,), generator=gen)
        else:
            targets = ids.masked_fill(mask == 0, -100)
        out.append(({"input_ids": ids, "attention_mask": mask}, targets))
    return out


def _rmsnorm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_rmsnorm(model: nn.Module) -> nn.Module:
    """Llama's RMSNorm computes in float32 by design (hesskit warns about it); for float64-exact
    checks each one here computes the same formula in its input's dtype."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rmsnorm_in_input_dtype, m)
    return model


def make_hf_case(name: str, attn: str = "sdpa", seed: int = 0) -> HFCase:
    torch.manual_seed(seed)
    model = exact_rmsnorm(BUILDERS[name](attn=attn).double().eval())
    with torch.no_grad():  # LayerNorm/RMSNorm weights away from 1 so their second derivatives matter
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n.lower() or n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
    if name == "bert":
        return HFCase(name, model, nn.CrossEntropyLoss(), token_batches(classes=3, seed=seed))
    return HFCase(name, model, hk.SequenceCrossEntropy(shift=True), token_batches(seed=seed))


def same_weights(model: nn.Module, other: nn.Module) -> nn.Module:
    other.load_state_dict(model.state_dict())
    return other


def snapshot(model: nn.Module) -> dict:
    """What a hesskit call must leave as it was: weights and buffers, modes, requires_grad, .grad."""
    return dict(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modes=[m.training for m in model.modules()],
        flags=[p.requires_grad for p in model.parameters()],
        grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(after["grads"], before["grads"]))
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if hk.layers.is_conv1d(module):
            linear = nn.Linear(*module.weight.shape, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin
