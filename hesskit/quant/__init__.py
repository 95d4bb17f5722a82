"""Hessian-aware quantization: fake quantization, sensitivities, bit allocation, GPTQ.

    import hesskit as hk
    q = hk.quant.quantize_model(model, bits=4, granularity="channel")          # a quantized copy (RTN)
    sens = hk.quant.sensitivities(model, criterion, data, metric="trace")      # HAWQ-V2: Tr(H_i) / n_i
    bits = hk.quant.allocate_bits(model, sens, avg_bits=2.5)                   # exact, under the size budget
    q = hk.quant.gptq(model, calibration_inputs, bits=3)                       # GPTQ, a quantized copy

Modules: `fake` (grids, granularities, straight-through estimator, size accounting), `sensitivity`
(HAWQ, HAWQ-V2, Q-BERT and measured sensitivities), `allocate` (exact knapsack DP and Pareto
frontier, HAWQ-V3 integer programs, bisection, exhaustive ground truth) and `gptq`. No function
modifies the model it is given: each returns a copy or a number.

Hugging Face models work as they are: transformers' `Conv1D` (GPT-2) is quantized as the linear
layer it is (`layer_weight`: its (out, in) view), inputs may be dicts (`model(**inputs)`), a
ModelOutput's `logits` is what a criterion sees unless `output_fn=` says otherwise, and a tied weight
is one layer, named after its first module (GPT-2's `transformer.wte`, which `lm_head` shares). Every
compressed copy carries `.compression`, a `CompressionReport` of the layers compressed and the
weights left alone; functions that choose the layers themselves also name the latter in an
`UncompressedWarning`.
"""

from .allocate import (
    Allocation,
    allocate_bits,
    allocate_bits_ilp,
    bisection_search,
    bops_table,
    cost_table,
    exhaustive,
    fine_tuning_order,
    interpolated_limit,
    layer_macs,
    pareto_frontier,
    random_configs,
)
from .fake import (
    GRANULARITIES,
    ActivationQuantizer,
    CompressionReport,
    ModelSize,
    QuantizedLayer,
    UncompressedWarning,
    fake_quantize,
    freeze,
    grid,
    layer_bits,
    layer_weight,
    model_size,
    observe_activations,
    quantizable_layers,
    quantization_aware,
    quantization_error,
    quantize_model,
    round_to_grid,
    ste_fake_quantize,
)
from .gptq import gptq, gptq_layer, gptq_layers, layer_hessian, layer_inputs, round_to_nearest
from .sensitivity import Sensitivities, pair_interactions, rank_correlation, sensitivities

__all__ = [
    # fake quantization
    "GRANULARITIES",
    "fake_quantize",
    "ste_fake_quantize",
    "quantization_error",
    "grid",
    "round_to_grid",
    "quantizable_layers",
    "layer_weight",
    "layer_bits",
    "quantize_model",
    "ModelSize",
    "model_size",
    "ActivationQuantizer",
    "QuantizedLayer",
    "quantization_aware",
    "observe_activations",
    "freeze",
    # what a compression function did
    "CompressionReport",
    "UncompressedWarning",
    # sensitivities
    "sensitivities",
    "Sensitivities",
    "rank_correlation",
    "pair_interactions",
    # allocation
    "allocate_bits",
    "Allocation",
    "pareto_frontier",
    "cost_table",
    "allocate_bits_ilp",
    "interpolated_limit",
    "layer_macs",
    "bops_table",
    "fine_tuning_order",
    "exhaustive",
    "random_configs",
    "bisection_search",
    # GPTQ
    "gptq",
    "gptq_layer",
    "gptq_layers",
    "layer_hessian",
    "layer_inputs",
    "round_to_nearest",
]
