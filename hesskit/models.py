"""The small reference models used by the tests, notebooks and benchmarks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MLP", "SmallCNN", "BatchNormCNN", "TinyTransformer", "CharTransformerLM"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class MLP(nn.Sequential):
    """Fully connected network: Linear -> activation, repeated, then a Linear head."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (32,), out_features: int = 10,
                 activation: str = "tanh"):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation)]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """Two conv -> activation -> 2x2 max-pool stages and a linear head, for 1 x 8 x 8 digits.

    The default (16, 32) channels give 6,090 parameters; `hidden` adds a fully connected layer.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), num_classes: int = 10, hidden: int | None = None,
                 activation: str = "tanh", in_channels: int = 1, image_size: int = 8):
        c1, c2 = channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c1, 3, padding=1), _activation(activation), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), _activation(activation), nn.MaxPool2d(2), nn.Flatten(),
        ]
        width = c2 * (image_size // 4) ** 2
        if hidden:
            layers += [nn.Linear(width, hidden), _activation(activation)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class BatchNormCNN(nn.Sequential):
    """SmallCNN with BatchNorm2d after each convolution (use it in eval mode for curvature)."""

    def __init__(self, channels: tuple[int, int] = (8, 16), num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 8):
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(c2 * (image_size // 4) ** 2, num_classes),
        )


class _SelfAttention(nn.Module):
    """Multi-head self-attention written out in matrix products (readable, double-differentiable).

    With `causal=True` position t attends only to positions <= t (for language models)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of dim={dim}, got {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, t, d))


class TinyTransformer(nn.Module):
    """A one-block pre-LayerNorm transformer encoder for sequence classification.

    tokens (B, T) -> embeddings + positions -> x + Attn(LN(x)) -> x + MLP_GELU(LN(x)) -> LN ->
    mean over positions -> linear head (B, num_classes).
    """

    def __init__(self, vocab: int = 6, num_classes: int | None = None, dim: int = 16, heads: int = 2,
                 max_length: int = 32, mlp_ratio: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(max_length, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab if num_classes is None else num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm_out(x).mean(dim=1))


class _CausalBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn_causal(LN(x)), then x + MLP_GELU(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads, causal=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharTransformerLM(nn.Module):
    """A tiny causal transformer language model over characters (GPT-style, pre-LayerNorm).

    tokens (B, T) -> embeddings + learned positions -> `blocks` causal blocks -> LN -> linear
    head: next-token logits (B, T, vocab), where logits[:, t] only sees tokens[:, :t + 1].
    The defaults (vocab 26, dim 32, 2 blocks, 4 heads, max_length 64) give 29,210 parameters.
    Attention is written out in matrix products, so Hessian-vector products work.
    """

    def __init__(self, vocab: int = 26, dim: int = 32, blocks: int = 2, heads: int = 4, max_length: int = 64,
                 mlp_ratio: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(max_length, dim))
        self.blocks = nn.Sequential(*(_CausalBlock(dim, heads, mlp_ratio) for _ in range(blocks)))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > len(self.position):
            raise ValueError(f"tokens: expected at most max_length={len(self.position)} positions, got {tokens.shape[1]}")
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm_out(self.blocks(x)))
