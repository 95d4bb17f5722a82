"""Notebook 12 (`12_qbert_groupwise.ipynb`): the Q-BERT explorer, ranges per matrix, bits and
quantization-aware fine-tuning of the trained tiny transformer.

What it shows is computed in `hesskit.experiments.qbert` (`group_sweep`, `qat_finetune`); this
module holds the controls and the drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..experiments.qbert import GroupSweep, QATRun, group_options, group_sweep, qat_finetune
from ..experiments.tasks import TrainedModel
from .explorer import Explorer

__all__ = ["QBERTExplorer"]


class QBERTExplorer(Explorer):
    """Q-BERT's knobs on the trained tiny transformer: ranges per matrix (one, per head, half a
    head, per row), bits of the block's matrices, and optional quantization-aware fine-tuning for a
    number of steps. Shows test accuracy against the number of ranges (round-to-nearest at these
    bits, and the fine-tuned model), the model size with its scale overhead, and the fine-tuning
    curve. Round-to-nearest results are cached per bits, fine-tuning runs per setting."""

    def __init__(self, task: TrainedModel, bits: int = 2, groups: str = "per head", qat: bool = False,
                 steps: int = 200, max_steps: int = 500, lr: float = 1e-3, outer_bits: int | None = 8):
        import ipywidgets as widgets

        self.task, self.lr, self.outer_bits = task, float(lr), outer_bits
        self.options = group_options(task.model)
        if groups not in self.options:
            raise ValueError(f"groups: expected one of {list(self.options)}, got {groups!r}")
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"bits: expected 2..8, got {bits!r}")
        if not 0 <= int(steps) <= max_steps:
            raise ValueError(f"steps: expected 0..{max_steps}, got {steps!r}")
        self._sweeps: dict[int, GroupSweep] = {}
        self._runs: dict[tuple, QATRun] = {}
        style = {"description_width": "initial"}
        super().__init__({
            "groups": widgets.ToggleButtons(options=list(self.options), value=groups, description="ranges",
                                            style=style),
            "bits": widgets.IntSlider(value=int(bits), min=2, max=8, description="bits (block)",
                                      continuous_update=False, style=style),
            "qat": widgets.ToggleButtons(options=[("no fine-tuning", False), ("QAT (STE)", True)], value=bool(qat),
                                         description="fine-tune", style=style),
            "steps": widgets.IntSlider(value=int(steps), min=0, max=int(max_steps), step=max(1, int(max_steps) // 10),
                                       description="QAT steps",
                                       continuous_update=False, style=style),
        })

    def sweep(self, bits: int) -> GroupSweep:
        """Round-to-nearest accuracy of every grouping at `bits` (cached)."""
        if bits not in self._sweeps:
            self._sweeps[bits] = group_sweep(self.task.model, self.task.test, [bits], list(self.options.values()),
                                             self.outer_bits, labels=list(self.options))
        return self._sweeps[bits]

    def add_runs(self, runs: Sequence[QATRun]) -> None:
        """Reuse fine-tuning runs made elsewhere on this task (same lr, uniform bits, a grouping of
        the widget) instead of training them again when the controls select them."""
        labels = {g: label for label, g in self.options.items()}
        for r in runs:
            if isinstance(r.bits, int) and r.group_size in labels and r.lr == self.lr:
                self._runs[(r.bits, labels[r.group_size], int(r.steps[-1]))] = r

    def qat_run(self, bits: int, groups: str, steps: int) -> QATRun:
        """The fine-tuning run for this setting (cached)."""
        key = (int(bits), groups, int(steps))
        if key not in self._runs:
            self._runs[key] = qat_finetune(self.task.model, self.task.train, self.task.test, int(bits),
                                           self.options[groups], self.outer_bits, steps=int(steps), lr=self.lr,
                                           eval_every=max(1, int(steps) // 10) if steps else 1)
        return self._runs[key]

    def compute(self, groups: str, bits: int, qat: bool, steps: int) -> dict:
        sweep = self.sweep(int(bits))
        j = sweep.labels.index(groups)
        run = self.qat_run(bits, groups, steps) if qat else None
        return {
            "groups": groups, "bits": int(bits), "qat": bool(qat), "steps": int(steps), "sweep": sweep, "index": j,
            "rtn_accuracy": float(sweep.accuracy[0, j]), "size": sweep.size[0][j],
            "qat_accuracy": run.final_accuracy if run is not None else math.nan, "run": run,
            "fp_accuracy": self.task.test_metrics.accuracy,
            "fp_kilobytes": sweep.size[0][j].float32_bits / 8 / 1024,
        }

    def draw(self, result: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(14, 4.2), layout="constrained")
        ax_acc, ax_size, ax_qat = fig.subplots(1, 3, width_ratios=[1.1, 1.0, 1.0])
        self._draw_accuracy(ax_acc, result)
        self._draw_size(ax_size, result)
        self._draw_qat(ax_qat, result)
        return fig

    def _draw_accuracy(self, ax_acc, result: dict) -> None:
        """Test accuracy against the number of ranges in the qkv matrix, the selected grouping marked."""
        sweep, j = result["sweep"], result["index"]
        x = sweep.qkv_ranges
        ax_acc.axhline(100 * result["fp_accuracy"], color="k", ls="--", lw=1, label="float32")
        ax_acc.plot(x, 100 * sweep.accuracy[0], "o-", color="tab:blue", label=f"{result['bits']}-bit, round-to-nearest")
        ax_acc.plot(x[j], 100 * sweep.accuracy[0, j], "o", ms=13, mfc="none", mec="tab:red", mew=2,
                    label=f"selected: {result['groups']}")
        if result["qat"]:
            ax_acc.plot(x[j], 100 * result["qat_accuracy"], "*", ms=15, color="tab:green",
                        label=f"after {result['steps']} QAT steps")
        ax_acc.set_xscale("log", base=2)
        short = {"1 per matrix": "matrix", "per head": "head", "half head": "½ head", "per row": "row"}
        ax_acc.set_xticks(x, [f"{r}\n{short.get(lab, lab)}" for r, lab in zip(x, sweep.labels)], fontsize=8)
        ax_acc.set_xlabel("ranges in the fused qkv matrix (one per ...)")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_title(f"accuracy: {result['bits']}-bit block, {self.outer_bits}-bit embedding and head", fontsize=10)
        ax_acc.legend(fontsize=8, loc="best")
        ax_acc.grid(alpha=0.3)

    @staticmethod
    def _draw_size(ax_size, result: dict) -> None:
        """The quantized model's size by part (weights, scales, embedding and head, float rest) against float32."""
        size = result["size"]
        kb = 1 / 8 / 1024
        parts = [("block weights", size.encoder_weight_bits * kb, "tab:blue"),
                 ("block scales", size.encoder_scale_bits * kb, "tab:red"),
                 ("embedding + head", size.outer_bits * kb, "tab:orange"),
                 ("float32 rest", size.float_bits * kb, "silver")]
        left = 0.0
        for label, value, color in parts:
            ax_size.barh([0], [value], left=left, color=color, label=f"{label}: {value:.2f} KB")
            left += value
        ax_size.barh([1], [result["fp_kilobytes"]], color="tab:purple", alpha=0.7,
                     label=f"float32 model: {result['fp_kilobytes']:.1f} KB")
        ax_size.set_yticks([0, 1], ["quantized", "float32"])
        ax_size.set_xlabel("model size (KB)")
        ax_size.set_title(f"{size.kilobytes:.2f} KB, {size.compression:.1f}x smaller; block: "
                          f"{size.encoder_bits_per_weight:.2f} bits/weight", fontsize=10)
        ax_size.legend(fontsize=8, loc="lower right")
        ax_size.set_xlim(0, 1.02 * result["fp_kilobytes"])

    @staticmethod
    def _draw_qat(ax_qat, result: dict) -> None:
        """The fine-tuning curve (test accuracy of the quantized model per checkpoint), or a note when off."""
        run = result["run"]
        if run is None:
            ax_qat.text(0.5, 0.5, "fine-tuning off:\nchoose 'QAT (STE)'", ha="center", va="center", fontsize=11,
                        transform=ax_qat.transAxes, color="0.4")
            ax_qat.set_xticks([])
            ax_qat.set_yticks([])
        else:
            ax_qat.axhline(100 * result["fp_accuracy"], color="k", ls="--", lw=1, label="float32")
            ax_qat.plot(run.steps, 100 * run.accuracy, "o-", color="tab:green",
                        label=f"{result['bits']}-bit, {result['groups']}")
            ax_qat.grid(alpha=0.3)
            ax_qat.legend(fontsize=8, loc="best")
        ax_qat.set_xlabel("QAT step")
        ax_qat.set_ylabel("test accuracy of the quantized model (%)")
        ax_qat.set_title("quantization-aware fine-tuning (STE)", fontsize=10)
