"""Hessian-aware quantization: fake quantization, sensitivities, bit allocation, GPTQ.

    import hesskit as hk
    q = hk.quant.quantize_model(model, bits=4)                                 # a quantized copy (RTN)
    sens = hk.quant.sensitivities(model, criterion, data, metric="trace")      # HAWQ-V2: Tr(H_i) / n_i
    bits = hk.quant.allocate_bits(model, sens, avg_bits=2.5)                   # exact, under the size budget
    cross = hk.quant.cross_layer_interactions(model, criterion, data)          # CLADO: every pair of layers
    bits = hk.quant.allocate_bits_iqp(hk.quant.cost_table(model, cross), 2.5)  # its IQP, exactly (a MILP)
    q = hk.quant.gptq(model, calibration_inputs, bits=3)                       # GPTQ, a quantized copy

`hk.quant` holds what a user calls and the results handed back. The helpers stay in their modules:
`fake` (grids and rounding, `grid`, `round_to_grid`, the straight-through `ste_fake_quantize`,
`QuantizedLayer`, `ActivationQuantizer`, `layer_weight`, `layer_bits`, and `LayerSwapper`, the
working copy every measured loss runs on), `sensitivity` (`rank_correlation`), `allocate` (the
resources of HAWQ-V3's program, `layer_macs`, `bops_table`, `interpolated_limit`, `size_limit`;
CLADO's PSD projection `psd_part`; the exhaustive ground truth `exhaustive`, `random_configs`,
`fine_tuning_order`) and `gptq`
(`gptq_layer`, `gptq_layers`, `layer_hessian`, `layer_inputs`, `round_to_nearest`): e.g.
`from hesskit.quant.fake import grid`. No function modifies the model it is given: each returns a
copy or a number.

Every function that takes a quantizer has the same defaults, chosen by measurement (the docstring of
`hesskit.quant.fake` gives it): one asymmetric min-max range per output channel
(`granularity=None, symmetric=False`); `group_size=g` alone means GPTQ's groups of g input columns.
HAWQ-V3 and Q-BERT used symmetric grids: `symmetric=True`.

Hugging Face models work as they are: transformers' `Conv1D` (GPT-2) is quantized as the linear
layer it is (`layer_weight`: its (out, in) view), inputs may be dicts (`model(**inputs)`), a
ModelOutput's `logits` is what a criterion sees unless `output_fn=` says otherwise, and a tied weight
is one layer, named after its first module (GPT-2's `transformer.wte`, which `lm_head` shares). Every
compressed copy carries `.compression`, a `CompressionReport` of the layers compressed and the
weights left alone; functions that choose the layers themselves also name the latter in an
`UncompressedWarning`.
"""

from .allocate import (Allocation, BisectionResult, CostTable, ParetoFrontier, allocate_bits, allocate_bits_ilp,
                       allocate_bits_iqp, bisection_search, cost_table, pareto_frontier)
from .fake import (GRANULARITIES, CompressionReport, ModelSize, UncompressedWarning, fake_quantize, freeze, model_size,
                   observe_activations, quantizable_layers, quantization_aware, quantization_error, quantize_model)
from .gptq import gptq
from .sensitivity import (CrossLayerInteractions, PairInteractions, Sensitivities, cross_layer_interactions,
                          pair_interactions, sensitivities)

__all__ = [
    # quantize a model
    "GRANULARITIES",
    "fake_quantize",
    "quantization_error",
    "quantizable_layers",
    "quantize_model",
    "model_size",
    "ModelSize",
    "quantization_aware",
    "observe_activations",
    "freeze",
    "gptq",
    # what a compression function did
    "CompressionReport",
    "UncompressedWarning",
    # how sensitive each layer is
    "sensitivities",
    "Sensitivities",
    "pair_interactions",
    "PairInteractions",
    "cross_layer_interactions",
    "CrossLayerInteractions",
    # which width for each layer
    "allocate_bits",
    "Allocation",
    "pareto_frontier",
    "ParetoFrontier",
    "cost_table",
    "CostTable",
    "allocate_bits_ilp",
    "allocate_bits_iqp",
    "bisection_search",
    "BisectionResult",
]
