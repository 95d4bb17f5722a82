"""The synthetic character corpus, its next-character windows, and the tiny causal transformer LM."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import hesskit as hk


def entropy_bits(counts: Counter) -> float:
    n = sum(counts.values())
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def test_text_is_seeded_grammatical_and_structured():
    corpus = hk.data.text(20_000, seed=0)
    assert len(corpus) == 20_000 and corpus == hk.data.text(20_000, seed=0) and corpus != hk.data.text(20_000, seed=1)
    assert set(corpus) <= set("abcdefghijklmnopqrstuvwxyz ,.") and len(set(corpus)) == 26
    assert not re.search(r"\ba [aeiou]", corpus) and re.search(r"\ban [aeiou]", corpus)  # "an old", never "a old"
    assert re.search(r"\bthe dog (sees|likes|follows|finds|watches|chases|helps|knows|sleeps|runs)", corpus)
    assert not re.search(r"\bthe dogs (sees|likes|sleeps|runs)\b", corpus)  # subject-verb agreement
    # Structure: the next character given the previous two is far more predictable than a unigram draw.
    unigram = entropy_bits(Counter(corpus))
    trigram, context = Counter(corpus[i : i + 3] for i in range(len(corpus) - 2)), Counter(
        corpus[i : i + 2] for i in range(len(corpus) - 2))
    conditional = entropy_bits(trigram) - entropy_bits(context)
    assert unigram > 3.9 and conditional < 0.5 * unigram


def test_char_windows_are_shifted_next_character_targets_with_a_held_out_tail():
    corpus = hk.data.text(5_000, seed=3)
    (x, y), (xt, yt), vocab = hk.data.char_windows(corpus, length=16, test_fraction=0.2, stride=8)
    decode = lambda ids: "".join(vocab[i] for i in ids.tolist())  # noqa: E731
    assert vocab == "".join(sorted(set(corpus))) and x.dtype == torch.int64 and x.shape[1] == 16
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(xt[:, 1:], yt[:, :-1])
    assert decode(x[1]) == corpus[8:24] and decode(y[1]) == corpus[9:25]
    assert decode(xt[0]) == corpus[4000:4016] and len(x) == (4000 - 17) // 8 + 1
    assert hk.data.char_windows(corpus, 16, test_fraction=0.0)[1][0].shape == (0, 16)
    with pytest.raises(ValueError, match="test_fraction"):
        hk.data.char_windows(corpus, 16, test_fraction=1.0)
    with pytest.raises(ValueError, match="too short"):
        hk.data.char_windows(corpus[:10], 16)


def test_char_lm_is_causal_sized_and_twice_differentiable():
    torch.manual_seed(0)
    model = hk.models.CharTransformerLM().double()
    assert sum(p.numel() for p in model.parameters()) == 29_210
    tokens = torch.randint(26, (3, 12))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 26
    out, out2 = model(tokens), model(changed)
    assert out.shape == (3, 12, 26)
    assert torch.allclose(out[:, :5], out2[:, :5]) and not torch.allclose(out[:, 5:], out2[:, 5:])
    loss = F.cross_entropy(out.flatten(0, 1), tokens.roll(-1, 1).flatten())
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, v)  # needs double backward through attention and LayerNorm
    assert all(torch.isfinite(h).all() for h in hv) and sum(h.abs().sum() for h in hv) > 0
    with pytest.raises(ValueError, match="max_length"):
        model(torch.zeros(1, 65, dtype=torch.int64))


def test_a_tiny_lm_learns_well_below_the_unigram_entropy():
    torch.manual_seed(0)
    corpus = hk.data.text(20_000, seed=0)
    (x, y), (xt, yt), vocab = hk.data.char_windows(corpus, length=16)
    model = hk.models.CharTransformerLM(len(vocab), dim=16, blocks=1, heads=2, max_length=16, mlp_ratio=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(len(x), (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]).flatten(0, 1), y[idx].flatten()).backward()
        opt.step()
    with torch.no_grad():
        test_bits = F.cross_entropy(model(xt).flatten(0, 1), yt.flatten()).item() / math.log(2)
    assert test_bits < 0.7 * entropy_bits(Counter(corpus))
