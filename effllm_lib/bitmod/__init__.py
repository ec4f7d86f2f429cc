"""BitMoD (Chen, AbouElhamayed, et al., HPCA 2025): mixture-of-datatype weight quantization and its accelerator.

Part 1, the quantizer: ``datatypes`` (value sets of INT / FP / FLINT and BitMoD's special-value types),
``quantize`` (``quantize_(model, BitMoDConfig(...))`` and the baselines). Perplexity and zero-shot accuracy
live in ``effllm_lib.eval``.
"""

from .datatypes import GRIDS, Grid, bitmod_grids, grid, round_to_values
from .quantize import (DTYPES, BitMoDConfig, QuantReport, bits_per_weight, quantize_, quantize_tensor,
                       relative_mse_table, synthetic_groups)

from .packed import BitMoDLinear, dequantize, load_packed_, pack_, pack_weight

# --- accelerator exports (added by the accelerator part) go below this line ---
from . import accel_study, pe_terms
from .accelerator import DESIGNS, Design, SramEnergy, area_table, evaluate, headline_ratios, simulate, speedups
from .llm_shapes import PAPER_MODELS, SMALL_MODELS, ModelShape, model_shape, shape_from_config
