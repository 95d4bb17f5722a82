"""Criteria for the outputs of real models, in the `criterion(outputs, targets)` form every hesskit
operator, optimizer and compression function takes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SequenceCrossEntropy"]


class SequenceCrossEntropy(nn.Module):
    """Token cross-entropy for sequence outputs: logits (B, T, V) against labels (B, T), the mean over
    every token whose label is not `ignore_index` (padding), as Hugging Face models compute it.

    `shift=True` scores position t's logits against token t + 1 (a causal LM's `labels=input_ids`
    convention, where the model shifts internally). Logits (B, V) with labels (B,) are plain
    classification. A sample is a sequence: a batch's loss is its token mean, and per-sample terms
    (the empirical Fisher, the exact GGN diagonal) use each sequence's own token mean.
    """

    reduction = "mean"

    def __init__(self, ignore_index: int = -100, shift: bool = False):
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.shift = bool(shift)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
            raise ValueError(f"SequenceCrossEntropy: expected logits (..., V) and labels of their leading shape, got "
                             f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, shift={self.shift}"
