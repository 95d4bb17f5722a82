"""What the training experiments of the notebooks and benchmarks share: the batch order every
optimizer sees, the checkpoint plan, the closure contract and the run record's common readings."""

from __future__ import annotations

import math

import torch

__all__ = ["batch_order", "best_run", "run_plan", "loss_and_accuracy", "TrainingRecord"]


def batch_order(num_samples: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Each step's batch indices: seeded reshuffles of the training set, epoch after epoch (the
    last incomplete batch of an epoch is dropped), so every optimizer sees the same batches."""
    if batch_size > num_samples:
        raise ValueError(f"batch_size: expected at most {num_samples} (the training set), got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    order = []
    perm, start = torch.randperm(num_samples, generator=gen), 0
    while len(order) < steps:
        if start + batch_size > num_samples:
            perm, start = torch.randperm(num_samples, generator=gen), 0
        order.append(perm[start : start + batch_size])
        start += batch_size
    return order


def best_run(runs):
    """The run with the lowest `final_loss` (inf when it diverged): the one an lr grid picks. Each
    explorer's run type says which loss that is (training or held-out)."""
    return min(runs, key=lambda r: r.final_loss)


def run_plan(num_samples: int, steps: int, batch_size: int, eval_every: int, seed: int) -> tuple[list, list[int]]:
    """A training run's budget, checked: each step's batch indices (`batch_order`) and the
    checkpoint steps (0, every `eval_every`, and the last)."""
    if not 1 <= batch_size <= num_samples:
        raise ValueError(f"batch_size: expected 1..{num_samples}, got {batch_size}")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps, eval_every: expected positive integers, got {steps} and {eval_every}")
    return batch_order(num_samples, steps, batch_size, seed), sorted(set(range(0, steps + 1, eval_every)) | {steps})


@torch.no_grad()
def loss_and_accuracy(model, criterion, data, test) -> tuple[float, float]:
    """(mean loss on `data`, nan if not finite; accuracy on `test`) at a checkpoint of a run."""
    loss = criterion(model(data[0]), data[1]).item()
    accuracy = (model(test[0]).argmax(dim=1) == test[1]).double().mean().item()
    return (loss if math.isfinite(loss) else math.nan), accuracy


class TrainingRecord:
    """What the optimizer notebooks read off a training run (a mixin for their `Run` dataclasses).

    The dataclass provides `optimizer`, `lr`, `steps` (checkpoint step numbers, 0 first),
    `train_loss` and `test_accuracy` at the checkpoints, `step_times` (seconds per optimizer
    step) and `diverged`; `labels` maps optimizer keys to display names.
    """

    labels: dict[str, str] = {}

    @property
    def label(self) -> str:
        return f"{self.labels.get(self.optimizer, self.optimizer)} (lr {self.lr:.3g})"

    @property
    def wall(self):
        """Cumulative optimizer seconds at each checkpoint (nan after a divergence)."""
        import numpy as np

        clock = np.concatenate([[0.0], np.cumsum(self.step_times)])
        return np.where(self.steps < len(clock), clock[np.minimum(self.steps, len(clock) - 1)], np.nan)

    @property
    def final_loss(self) -> float:
        """The last full training loss (inf if the run diverged)."""
        value = float(self.train_loss[-1])
        return value if math.isfinite(value) and not self.diverged else math.inf

    @property
    def final_accuracy(self) -> float:
        value = float(self.test_accuracy[-1])
        return value if math.isfinite(value) else math.nan

    @property
    def median_step_time(self) -> float:
        import numpy as np

        return float(np.median(self.step_times)) if len(self.step_times) else math.nan
