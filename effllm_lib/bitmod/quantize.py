"""Per-group fake quantization of LLM weights with BitMoD and its baselines.

    from effllm_lib.bitmod import quantize_, BitMoDConfig
    report = quantize_(model, BitMoDConfig(bits=3, group_size=128, dtype="bitmod"))
    report.bits_per_weight, report.type_counts, report.layers  # accounting, chosen types, per-layer MSE

Weights are split into groups of ``group_size`` consecutive values along the input dimension (a Linear
weight is ``[out_features, in_features]``, so along each row). When ``in_features`` is not a multiple of the
group size (SmolLM2's hidden size 576 = 4.5 x 128) the last group of each row is shorter. Every group
gets its own scale; the dequantized ("fake-quantized") weight replaces the float one, so any float forward
pass measures the accuracy of the quantized model.

``dtype`` (``DTYPES``):

* ``int`` / ``int_asym`` - INT-b symmetric (absmax scale) / asymmetric (min-max scale and integer zero point),
* ``fp``, ``flint`` - FP3/FP4 (E2M1) and ANT's FLINT4 with an absmax scale,
* ``fp_er_pos`` ... ``fp_ea_neg`` - one BitMoD special-value type for every group,
* ``bitmod`` - per group the lowest-MSE of ER+, ER-, EA+, EA- (ties to the earlier; 2-bit type id),
* ``er`` / ``ea`` - the ablations that choose only between ER+/ER- or EA+/EA- (1-bit type id),
* ``ant`` - ANT per group: INT4 vs FLINT4 at 4 bits, INT3 vs FP3 at 3 bits (1-bit type id),
* ``olive`` - OliVe's outlier-victim pairs (see ``_olive``),
* ``nf4`` - QLoRA's NormalFloat4 (normal quantiles) with an absmax scale (4 bits only),
* ``iq4_nl`` - llama.cpp's IQ4_NL: group 32, 16 non-uniform int8 levels, an FP16 scale fitted by llama.cpp's own
  weighted least-squares search (``_iq4_nl``; with ``calibration`` its importance-matrix weighting),
* ``q4_k`` / ``q3_k`` - llama.cpp's k-quants (``kquants.py``): super-blocks of 256 with 6-bit sub-block scales
  (and mins) under FP16 super-block scales, 4.5 / 3.4375 bits per weight, counted exactly (a short last
  super-block included) whatever ``accounting`` says,
* ``mxfp`` - MX-FP4 / MX-FP3: group 32, shared power-of-two (E8M0) scale, OCP rounding rule,
* ``nvfp`` - NVFP4: group 16, FP8-E4M3 block scale under a per-tensor FP32 scale. NVFP3 (the FP3 grid with the
  same scaling) is our extension for a 3-bit point; no such standard format exists.

The MX and NV formats fix their own group size (32 / 16) whatever ``group_size`` says.

Equal treatment (the same options for every ``dtype``):

* ``clip=True`` - per group, the scale is also tried shrunk by each of ``CLIP_RATIOS`` (1.0 ... 0.55, AWQ's
  clipping grid) and the lowest-error one kept; for selection methods the type and ratio are chosen jointly.
  OliVe always searches its own normal-range scale (its outlier threshold has no closed form), with or without.
* ``calibration="act"`` - the type selection and the clipping search minimise the squared error weighted by
  each input channel's activation second moment on calibration text (an importance matrix, as llama.cpp's
  imatrix), so the per-group choice approximates the layer-output error rather than the weight error.
* ``calibration="awq"`` - AWQ's per-input-channel scaling (Lin et al., MLSys 2024): the weight is quantized as
  ``Q(W diag(s)) diag(s)^-1`` with ``s = mean|x|^alpha``, alpha searched on a 20-point grid for the lowest
  output error on the calibration activations, one ``s`` shared by the layers that read the same tensor (q/k/v,
  gate/up) because AWQ folds it into the norm or the previous layer; then as "act" on the scaled weight.
* ``calibration="gptq"`` - GPTQ (Frantar et al., ICLR 2023) on the data type's own grid (``gptq.py``): each
  group's type and scale chosen as round to nearest chooses them, then columns rounded in order with the error
  fed forward through the inverse of the calibration activations' Gram matrix (float model's activations, 1%
  damping, Cholesky, lazy blocks of 128).

Calibrated modes need ``quantize_(model, cfg, calibration=collect_activation_stats(model, windows))``
(``effllm_lib.bitmod.calibrate``; "gptq" with ``hessian=True``). ``nn.Linear`` and transformers' ``Conv1D``
(GPT-2) are quantized; any other
layer with a matrix weight (other than embeddings) is an error naming it unless ``skip`` names it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable

import pandas as pd
import torch
from torch import nn

from . import datatypes as dt

DTYPES = ("int", "int_asym", "fp", "flint", "fp_er_pos", "fp_er_neg", "fp_ea_pos", "fp_ea_neg",
          "bitmod", "er", "ea", "ant", "olive", "nf4", "iq4_nl", "mxfp", "nvfp", "q4_k", "q3_k")
CALIBRATIONS = ("none", "act", "awq", "gptq")
# Group-selection methods: the candidate types, in tie-break order.
_SELECTION = {
    "bitmod": lambda b: dt.bitmod_grids(b),
    "er": lambda b: dt.bitmod_grids(b)[:2],
    "ea": lambda b: dt.bitmod_grids(b)[2:],
    "ant": lambda b: (dt.INT4, dt.FLINT4) if b == 4 else (dt.INT3, dt.FP3),
}
_FIXED_GROUP = {"mxfp": 32, "nvfp": 16, "iq4_nl": 32, "q4_k": 256, "q3_k": 256}
_KQUANT_BITS = {"q4_k": 4, "q3_k": 3}
# The simulator's accounting: 8 metadata bits per group (scale and type id together).
PAPER_METADATA_BITS = 8
NVFP_TENSOR_SCALE_BITS = 32


@dataclass
class BitMoDConfig:
    """What ``quantize_`` does to a model.

    bits: 3 or 4. group_size: weights per group along the input dimension. dtype: one of ``DTYPES``.
    include_lm_head: quantize the output projection too (the paper does). untie_embeddings: if lm_head shares
    its weight with the input embedding, give lm_head its own copy first, so only lm_head is quantized (the
    paper's Llama models have untied heads); with False a tied head is an error rather than silently
    quantizing the embedding too. skip: module-name substrings to leave in float. chunk_elements: rows are
    quantized in chunks of about this many weights, which bounds the extra memory. accounting: ``"paper"``
    (8 bits of metadata per group, giving 4.0625 / 3.0625) or ``"fp16"`` (a 16-bit scale plus the type id).
    clip: the per-group clipping search (``CLIP_RATIOS``). calibration: ``"none"`` (round to nearest), ``"act"``
    (activation-weighted selection and clipping), ``"awq"`` (AWQ scaling, then as "act") or ``"gptq"``; see the
    module doc.
    packed: replace the quantized layers by ``packed.BitMoDLinear`` (3/4-bit codes, group scales, 2-bit type ids,
    run by the LUT kernels), so the model holds the packed bytes rather than float weights; only the
    BitMoD-grid data types pack.
    """

    bits: int = 4
    group_size: int = 128
    dtype: str = "bitmod"
    include_lm_head: bool = True
    untie_embeddings: bool = True
    skip: tuple[str, ...] = ()
    chunk_elements: int = 1 << 22
    accounting: str = "paper"
    clip: bool = False
    calibration: str = "none"
    packed: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.bits not in (3, 4):
            raise ValueError(f"bits must be 3 or 4, got {self.bits!r}")
        if self.dtype == "flint" and self.bits != 4:
            raise ValueError("FLINT is a 4-bit type (ANT's 3-bit choice is INT3 vs FP3: dtype='ant')")
        if self.dtype in _KQUANT_BITS and self.bits != _KQUANT_BITS[self.dtype]:
            raise ValueError(f"{self.dtype.upper()} is a {_KQUANT_BITS[self.dtype]}-bit type, got bits={self.bits}")
        if self.dtype in ("nf4", "iq4_nl") and self.bits != 4:
            raise ValueError(f"{self.dtype.upper()} is a 4-bit type (there is no standard 3-bit variant)")
        if self.packed and self.dtype not in ("bitmod", "er", "ea") and not self.dtype.startswith("fp_e"):
            raise ValueError(f"packed=True needs a BitMoD-grid data type (bitmod, er, ea, fp_e*), got {self.dtype!r}")
        if self.clip not in (True, False):
            raise ValueError(f"clip must be True or False, got {self.clip!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2, got {self.group_size!r}")
        if self.dtype == "olive" and self.group_size % 2:
            raise ValueError("OliVe pairs adjacent weights: group_size must be even")
        if self.accounting not in ("paper", "fp16"):
            raise ValueError(f"accounting must be 'paper' or 'fp16', got {self.accounting!r}")
        if self.chunk_elements < 1:
            raise ValueError("chunk_elements must be positive")
        self.skip = tuple(self.skip)

    @property
    def effective_group_size(self) -> int:
        return _FIXED_GROUP.get(self.dtype, self.group_size)

    @property
    def label(self) -> str:
        """e.g. ``bitmod3``, ``bitmod3+clip``, ``int_asym4+clip+awq``."""
        return (f"{self.dtype}{self.bits}" + ("+clip" if self.clip else "")
                + (f"+{self.calibration}" if self.calibration != "none" else ""))


# ------------------------------------------------------------------------------------------ group quantizers
# A candidate is a function (x [..., g], ratio, importance weights or None) -> dequantized x: one data type whose
# scale is ``ratio`` times its closed-form (absmax / min-max) scale (only IQ4_NL's own search uses the weights). ``_search`` keeps, per group, the (candidate, ratio) pair with the
# lowest (optionally activation-weighted) squared error; ratio 1 alone is plain round-to-nearest.
def _absmax(x: torch.Tensor, values: tuple[float, ...], ratio: float = 1.0) -> torch.Tensor:
    """Scale = ratio * absmax(group) / max|values|, round to the nearest value (values beyond the clipped range
    saturate); all-zero groups stay zero. ``values``: the sorted grid as a tuple (a tensor is accepted too)."""
    values = _as_tuple(values)
    scale = x.abs().amax(-1, keepdim=True) / dt.grid_max_abs(values, x.device, x.dtype)
    if ratio != 1.0:
        scale = scale * ratio
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return dt.round_to_grid(x / safe, values) * scale


def _as_tuple(values) -> tuple[float, ...]:
    """A grid as the hashable tuple the device caches key on (``values.tolist()`` of a tensor: one sync, so the
    quantizers themselves pass tuples)."""
    return tuple(values.tolist()) if isinstance(values, torch.Tensor) else tuple(values)


def _int_asym(x: torch.Tensor, bits: int, ratio: float = 1.0) -> torch.Tensor:
    """Min-max scale over 2^b levels and an integer zero point (clamped into the code range). With ratio < 1 the
    range [ratio*min, ratio*max] is used (GPTQ's MSE grid) and values outside it saturate."""
    qmax = 2 ** bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if ratio != 1.0:
        lo, hi = lo * ratio, hi * ratio
    scale = (hi - lo) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe).clamp(0, qmax)
    q = (torch.round(x / safe) + zero).clamp(0, qmax)
    return torch.where(scale > 0, (q - zero) * scale, x)  # a constant group is stored exactly by its zero point


def _mx(x: torch.Tensor, values: tuple[float, ...], ratio: float = 1.0) -> torch.Tensor:
    """OCP micro-scaling: shared scale 2^(floor(log2 amax) - emax of the element type); elements saturate.
    A clipping ratio shrinks amax before the exponent is taken (so it can only move the scale down a power of 2)."""
    amax = x.abs().amax(-1, keepdim=True)
    if ratio != 1.0:
        amax = amax * ratio
    values = _as_tuple(values)
    emax = math.floor(math.log2(max(abs(v) for v in values)))
    exponent = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))) - emax
    scale = torch.where(amax > 0, torch.exp2(exponent), torch.zeros_like(amax))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return dt.round_to_grid(x / safe, values) * scale


def _nvfp(x: torch.Tensor, values: tuple[float, ...], tensor_amax: float, ratio: float = 1.0) -> torch.Tensor:
    """NVFP4: block scale absmax/max|values| stored in FP8-E4M3 relative to a per-tensor FP32 scale that maps
    the tensor's largest block scale onto E4M3's largest value (448). A clipping ratio scales the block scale
    before it is rounded to E4M3."""
    values = _as_tuple(values)
    vmax = dt.grid_max_abs(values, x.device, x.dtype)
    tensor_scale = tensor_amax / (float(max(abs(v) for v in values)) * 448.0) if tensor_amax > 0 else 1.0
    amax = x.abs().amax(-1, keepdim=True)
    if ratio != 1.0:
        amax = amax * ratio
    block = dt.round_to_e4m3(amax / vmax / tensor_scale) * tensor_scale
    safe = torch.where(block > 0, block, torch.ones_like(block))
    return dt.round_to_grid(x / safe, values) * block


# OliVe's outlier magnitudes (in units of the normal-value scale): an "adaptive biased float" whose range starts
# just above the normal INT range. 4 bits: sign + E2M1 magnitudes {1, 1.5, ..., 12} x 2^3 = 8..96; 3 bits:
# sign + E1M1 magnitudes {1, 1.5, 2, 3} x 2^2 = 4..12. The INT code -2^(b-1) is reserved to mark the victim.
OLIVE_OUTLIER_MAGNITUDES = {4: (8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0), 3: (4.0, 6.0, 8.0, 12.0)}
OLIVE_SCALE_CANDIDATES = 12


@lru_cache(maxsize=4)
def _olive_ratios(bits: int) -> tuple[float, ...]:
    """OliVe's own scale search: normal scale = ratio * absmax / qmax for ratios log-spaced from 1 (plain INT,
    no outliers) down to qmax / (largest outlier magnitude) (the absmax lands on the largest outlier value)."""
    qmax = 2 ** (bits - 1) - 1
    return tuple(torch.logspace(0, math.log10(qmax / OLIVE_OUTLIER_MAGNITUDES[bits][-1]),
                                OLIVE_SCALE_CANDIDATES).tolist())


def _olive(x: torch.Tensor, bits: int, ratio: float) -> torch.Tensor:
    """Outlier-victim pair quantization (Guo et al., ISCA 2023) of groups at one normal scale.

    Adjacent weights (2i, 2i+1) form a pair. Normal values use INT-b (-(2^(b-1)-1)..2^(b-1)-1) with scale
    ``ratio * absmax / qmax``. A value whose nearest representable value is an outlier magnitude becomes an
    outlier: it is coded in the wider biased-float grid and its pair neighbour (the victim) is set to zero; if
    both are outliers the larger one is kept. Where the normal range ends is a free parameter of OliVe, so
    OliVe always searches ``_olive_ratios`` (ratio 1 = plain INT absmax, so OliVe never has a larger group
    error than INT-sym); the optional clipping search of the other types changes nothing for OliVe.
    """
    qmax = 2 ** (bits - 1) - 1
    normal = dt.int_grid(bits).values
    mags = OLIVE_OUTLIER_MAGNITUDES[bits]
    threshold = (qmax + mags[0]) / 2  # midpoint between the largest normal and smallest outlier value
    scale = x.abs().amax(-1, keepdim=True) * ratio / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (x / safe).unflatten(-1, (-1, 2))
    mag = y.abs()
    out = mag > threshold
    keep0 = out[..., 0] & (~out[..., 1] | (mag[..., 0] >= mag[..., 1]))
    keep1 = out[..., 1] & ~keep0
    keep = torch.stack([keep0, keep1], -1)
    victim = (keep0 | keep1).unsqueeze(-1) & ~keep
    q_out = torch.sign(y) * dt.round_to_grid(mag, mags)
    q = torch.where(keep, q_out, torch.where(victim, torch.zeros_like(y), dt.round_to_grid(y, normal)))
    return q.flatten(-2) * scale


# NF4 (QLoRA, Dettmers et al. 2023): the 16 quantiles of a standard normal, rescaled to [-1, 1], absmax scale.
NF4 = dt.Grid("nf4", (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                      0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                      0.7229568362236023, 1.0), 4)

# llama.cpp's IQ4_NL levels (kvalues_iq4nl), and how many scale candidates either side its quantizer tries.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4_NL_NTRY = 7


def _nearest_index_ties_up(y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``values``; an exact tie goes to the larger (llama.cpp's
    best_index_int8)."""
    return torch.bucketize(y, (values[1:] + values[:-1]) / 2, right=True)


def _iq4_nl(x: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``quantize_row_iq4_nl_impl`` for blocks of 32 (vectorized over groups): per group, with
    weights w = x^2 (or, given an importance matrix qw, w = qw * sqrt(sigma2 + x^2), sigma2 = 2 mean(x^2)), the
    scale d = sum(w q x) / sum(w q^2) of the codes q for the absmax-based scale, then of the 2*7+1 scales
    (itry - 127) / max, keeping the best; codes are re-rounded with the final d, stored as FP16.
    Returns (dequantized, the FP16 scale d per group)."""
    d = _iq4_nl_scale(x, importance)
    return _iq4_nl_round(x, d), d.to(torch.float16).to(x.dtype)


def _iq4_nl_round(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """IQ4_NL codes of ``x`` for the unrounded scale ``d`` (llama.cpp rounds with 1/d), dequantized with d in FP16."""
    values = dt.grid_tensor(IQ4_NL_VALUES, x.device, x.dtype)  # cached per device: no copy, no sync
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return values[_nearest_index_ties_up(inv * x, values)] * d.to(torch.float16).to(x.dtype)


def _iq4_nl_scale(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The (unrounded) scale d per group of ``_iq4_nl``'s search."""
    values = dt.grid_tensor(IQ4_NL_VALUES, x.device, x.dtype)  # cached per device: no copy, no sync
    if importance is None:
        w = x * x
    else:
        sigma2 = 2 * (x * x).mean(-1, keepdim=True)
        w = importance * torch.sqrt(sigma2 + x * x)
    amax, arg = x.abs().max(-1, keepdim=True)
    mx = x.gather(-1, arg)  # the signed value of largest magnitude
    live = amax > 1e-15
    safe_mx = torch.where(live, mx, torch.ones_like(mx))

    def fit(inv_scale):
        q = values[_nearest_index_ties_up(inv_scale * x, values)]
        return (w * q * x).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)

    sumqx, sumq2 = fit(1 / (-safe_mx / values[0]))
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), torch.zeros_like(sumq2))
    best = d * sumqx
    for itry in range(-IQ4_NL_NTRY, IQ4_NL_NTRY + 1):
        sumqx, sumq2 = fit((itry + values[0]) / safe_mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d_new = sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2))
        d = torch.where(better, d_new, d)
        best = torch.where(better, d_new * sumqx, best)
    return torch.where(live, d, torch.zeros_like(d))


# The clipping search's ratios: AWQ's auto_clip grid (max shrink 0.5 in steps of 1/20): 1.0, 0.95, ..., 0.55.
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))


def _search(x: torch.Tensor, candidates, ratios, weight: torch.Tensor | None):
    """Per group, the (candidate, ratio) with the lowest error: mean squared error, or with ``weight``
    (broadcastable to x: each input channel's activation second moment) the weighted mean. Strictly lower
    wins, so ties go to the earlier candidate and then to the larger ratio."""
    best_q = best_err = best_id = None
    for i, cand in enumerate(candidates):
        for r in ratios:
            q = cand(x, r, weight)
            d = (q - x).pow(2)
            err = (d * weight).mean(-1) if weight is not None else d.mean(-1)
            if best_q is None:
                best_q, best_err = q, err
                best_id = torch.zeros(err.shape, dtype=torch.int8, device=x.device)
                continue
            better = err < best_err
            best_q = torch.where(better.unsqueeze(-1), q, best_q)
            best_err = torch.where(better, err, best_err)
            if len(candidates) > 1:
                best_id = torch.where(better, torch.full_like(best_id, i), best_id)
    return best_q, (best_id if len(candidates) > 1 else None)


def candidate_names(dtype: str, bits: int) -> tuple[str, ...]:
    """The names of the types a selection method chooses between (empty for single-type methods)."""
    return tuple(g.name for g in _SELECTION[dtype](bits)) if dtype in _SELECTION else ()


def _candidates(dtype: str, bits: int, tensor_amax: float) -> tuple[list[Callable], list[float] | None]:
    """The candidate quantizers of one method, and the scale ratios the method itself always searches
    (None: only what the clipping option asks for)."""
    if dtype in _SELECTION:
        return [lambda x, r, w, v=g.values: _absmax(x, v, r) for g in _SELECTION[dtype](bits)], None
    if dtype == "int_asym":
        return [lambda x, r, w: _int_asym(x, bits, r)], None
    if dtype == "olive":
        return [lambda x, r, w: _olive(x, bits, r)], _olive_ratios(bits)
    if dtype in ("mxfp", "nvfp"):
        values = dt.fp_grid(bits).values
        if dtype == "mxfp":
            return [lambda x, r, w: _mx(x, values, r)], None
        return [lambda x, r, w: _nvfp(x, values, tensor_amax, r)], None
    if dtype == "nf4":
        return [lambda x, r, w: _absmax(x, NF4.values, r)], None
    if dtype == "iq4_nl":  # its own scale search; the importance weights are bound per call in quantize_tensor
        return [lambda x, r, w: _iq4_nl(x, w)[0]], [1.0]
    if dtype in _KQUANT_BITS:  # their own scale fits (llama.cpp's reference quantizers, no importance matrix)
        from . import kquants

        fn = kquants.q4_k if dtype == "q4_k" else kquants.q3_k
        return [lambda x, r, w: fn(x)], [1.0]
    name = {"int": f"int{bits}", "fp": f"fp{bits}", "flint": "flint4"}.get(dtype, dtype.replace("fp", f"fp{bits}"))
    values = dt.grid(name).values
    return [lambda x, r, w: _absmax(x, values, r)], None


def clip_ignored(dtype: str, bits: int) -> bool:
    """True when ``clip`` cannot change what ``quantize_tensor`` (and GPTQ) computes for ``dtype``: the method
    searches its own scales (OliVe, IQ4_NL, the k-quants), so its ratio list replaces ``CLIP_RATIOS``."""
    return _candidates(dtype, bits, 1.0)[1] is not None


def calibration_ignored(dtype: str, bits: int, clip: bool) -> bool:
    """True when ``calibration="act"`` cannot change the weights ``quantize_tensor`` returns: the per-group
    search has exactly one (candidate, ratio) pair, so the activation weights only scale an error that nothing
    is compared against, and the candidate itself does not read them (IQ4_NL's scale fit does). E.g. INT-asym,
    NF4, INT, FP, MX, NV without clipping, and the k-quants always."""
    candidates, own = _candidates(dtype, bits, 1.0)
    ratios = own or (CLIP_RATIOS if clip else (1.0,))
    return len(candidates) == 1 and len(ratios) == 1 and dtype not in _READS_IMPORTANCE


_READS_IMPORTANCE = ("iq4_nl",)  # candidates whose quantizer itself uses the importance weights


@lru_cache(maxsize=64)
def _absmax_value_tuples(dtype: str, bits: int) -> list[tuple[float, ...]] | None:
    """``_absmax_value_sets`` as tuples of floats (what the per-device caches key on), made once."""
    sets = _absmax_value_sets(dtype, bits)
    return None if sets is None else [tuple(v.tolist()) for v in sets]


def _absmax_value_sets(dtype: str, bits: int) -> list[torch.Tensor] | None:
    """The value sets of a method whose candidates are all ``_absmax`` quantizers (None for the others)."""
    if dtype in _SELECTION:
        return [g.tensor() for g in _SELECTION[dtype](bits)]
    if dtype == "nf4":
        return [NF4.tensor()]
    if dtype in ("int_asym", "olive", "mxfp", "nvfp", "iq4_nl", *_KQUANT_BITS):
        return None
    name = {"int": f"int{bits}", "fp": f"fp{bits}", "flint": "flint4"}.get(dtype, dtype.replace("fp", f"fp{bits}"))
    return [dt.grid(name).tensor()]


def _fast_search(dtype: str, bits: int, device: torch.device, work_dtype: torch.dtype) -> Callable | None:
    """The C search (``group_search``) for this method, when it has one and it can run here; else None."""
    from . import group_search

    if device.type != "cpu" or work_dtype != torch.float32 or not group_search.available():
        return None
    if dtype == "int_asym":
        return lambda x, ratios, w: (group_search.int_asym_search(x, bits, ratios, w), None)
    sets = _absmax_value_sets(dtype, bits)
    if sets is None:
        return None

    def search(x, ratios, w):
        q, ids = group_search.absmax_search(x, sets, ratios, w)
        return q, (ids if len(sets) > 1 else None)
    return search


# ---------------------------------------------------------------------------------------------- one tensor
# On a GPU, chunks of at least this many weights x ratios (~1 GB of temporaries): the work per chunk is tiny and
# small chunks leave the GPU waiting on kernel launches.
GPU_CHUNK_ELEMENTS = 1 << 25


@dataclass
class TensorQuant:
    """The dequantized weight, per-group type ids (selection methods only) and the group count."""

    weight: torch.Tensor
    type_ids: torch.Tensor | None
    n_groups: int


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, bits: int = 4, dtype: str = "bitmod", group_size: int = 128,
                    chunk_elements: int = 1 << 22, *, clip: bool = False,
                    col_weight: torch.Tensor | None = None, search: str = "auto", check: bool = True) -> TensorQuant:
    """Fake-quantize a 2-D weight ``[rows, in_features]`` in groups along the last dimension.

    Returns the dequantized weight (same shape and dtype as ``w``), the chosen type index per group
    ([rows, n_groups], int8; None unless ``dtype`` selects between types) and the number of groups.
    ``clip``: per group, also try the scale shrunk by each of ``CLIP_RATIOS`` and keep the lowest error.
    ``col_weight`` ([in_features], >= 0): weight each input channel's squared error by it in the type selection
    and the clipping search (the activation second moments of calibration text: an importance matrix).
    ``search``: "auto" runs the per-group search in C (``group_search``) for the absmax types and INT-asym on
    CPU float32 weights, "torch" always in torch (the reference the C search is tested against).
    ``check=False`` skips the finiteness checks of ``w`` and ``col_weight`` (each a host read, i.e. a GPU sync):
    for callers that checked them already (``quantize_`` checks every layer at once).
    """
    cfg = BitMoDConfig(bits=bits, group_size=group_size, dtype=dtype, chunk_elements=chunk_elements, clip=clip)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise ValueError(f"expected a 2-D weight tensor, got {getattr(w, 'shape', type(w))}")
    if not torch.is_floating_point(w):
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    if check and not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity")
    rows, cols = w.shape
    work_dtype = torch.promote_types(w.dtype, torch.float32)  # bf16/fp16 weights are quantized in float32
    if col_weight is not None:
        if not isinstance(col_weight, torch.Tensor) or col_weight.shape != (cols,):
            raise ValueError(f"col_weight must be a tensor of shape ({cols},), got {getattr(col_weight, 'shape', None)}")
        if check and not (torch.isfinite(col_weight) & (col_weight >= 0)).all():  # one host read, not two
            raise ValueError("col_weight must be finite and non-negative")
        col_weight = col_weight.to(w.device, work_dtype)
    g = cfg.effective_group_size
    if dtype == "olive" and cols % 2:
        raise ValueError(f"OliVe pairs adjacent weights: in_features must be even, got {cols}")
    if dtype in _KQUANT_BITS:
        from .kquants import SUB

        if cols % SUB[dtype]:
            raise ValueError(f"{dtype}: in_features {cols} is not a multiple of its sub-block of {SUB[dtype]}")
    full, tail = divmod(cols, g)
    if dtype == "olive" and tail % 2:
        raise ValueError(f"OliVe needs an even last group; in_features {cols} mod group {g} = {tail}")
    # NVFP's per-tensor scale is the only use of the tensor's absmax: read it back (a GPU sync) only then
    candidates, own_ratios = _candidates(dtype, bits, float(w.abs().max()) if dtype == "nvfp" else 0.0)
    ratios = own_ratios or (CLIP_RATIOS if clip else (1.0,))
    fast = _fast_search(dtype, bits, w.device, work_dtype) if search == "auto" else None
    if search not in ("auto", "torch"):
        raise ValueError(f"search must be 'auto' (C where it applies) or 'torch', got {search!r}")
    out = torch.empty_like(w)
    ids = torch.empty(rows, full + (tail > 0), dtype=torch.int8, device=w.device) if dtype in _SELECTION else None
    if w.device.type != "cpu":  # few large chunks: each costs ~25 kernel launches per candidate and ratio
        chunk_elements = max(chunk_elements, GPU_CHUNK_ELEMENTS)
    step = max(1, chunk_elements // max(cols, 1) // len(ratios))
    for r0 in range(0, rows, step):
        chunk = w[r0:r0 + step].to(work_dtype)
        pieces, id_pieces = [], []
        if full:
            cw = None if col_weight is None else col_weight[:full * g].view(full, g)
            x3 = chunk[:, :full * g].unflatten(-1, (full, g))
            q, i = fast(x3, ratios, cw) if fast else _search(x3, candidates, ratios, cw)
            pieces.append(q.flatten(-2))
            id_pieces.append(i)
        if tail:
            cw = None if col_weight is None else col_weight[full * g:].view(1, tail)
            x3 = chunk[:, full * g:].unsqueeze(1)
            q, i = fast(x3, ratios, cw) if fast else _search(x3, candidates, ratios, cw)
            pieces.append(q.flatten(-2))
            id_pieces.append(i)
        out[r0:r0 + step] = torch.cat(pieces, -1).to(w.dtype)
        if ids is not None:
            ids[r0:r0 + step] = torch.cat(id_pieces, -1)
    return TensorQuant(out, ids, rows * (full + (tail > 0)))


def metadata_bits_per_group(dtype: str, bits: int, accounting: str = "paper") -> float:
    """Bits stored per group besides the codes: scale, type id, zero point."""
    if dtype == "mxfp":
        return 8.0  # E8M0 shared exponent
    if dtype == "nvfp":
        return 8.0  # E4M3 block scale (the per-tensor FP32 scale is added per tensor)
    if dtype == "iq4_nl" and accounting == "fp16":
        return 16.0  # the FP16 scale of each block of 32 (4.5 bits/weight, as llama.cpp counts it)
    if dtype in _KQUANT_BITS:  # per full super-block of 256: 6-bit sub-block scales (+ mins) and FP16 d (+ dmin)
        from .kquants import kquant_bits

        return float(kquant_bits(dtype, 256) - bits * 256)
    type_id = math.ceil(math.log2(len(_SELECTION[dtype](bits)))) if dtype in _SELECTION else 0
    zero_point = bits if dtype == "int_asym" else 0
    if accounting == "paper":
        return PAPER_METADATA_BITS + zero_point
    return 16 + type_id + zero_point


def bits_per_weight(dtype: str, bits: int, group_size: int = 128, accounting: str = "paper") -> float:
    """Nominal storage bits per weight for full groups: ``bits + metadata / group`` (e.g. BitMoD-4 at group 128
    = 4.0625 with the paper's accounting, 4.140625 with an FP16 scale and a 2-bit type id)."""
    cfg = BitMoDConfig(bits=bits, group_size=group_size, dtype=dtype, accounting=accounting)
    return bits + metadata_bits_per_group(dtype, bits, accounting) / cfg.effective_group_size


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class QuantReport:
    """What ``quantize_`` did: per-layer error, chosen-type histogram, storage accounting, time."""

    config: dict
    layers: pd.DataFrame
    type_counts: dict = field(default_factory=dict)
    bits_per_weight: float = float("nan")
    nominal_bits_per_weight: float = float("nan")
    seconds: float = 0.0
    untied_lm_head: bool = False
    skipped: list = field(default_factory=list)  # layers left in float: skip / include_lm_head, embeddings

    @property
    def mse(self) -> float:
        """Weight-count-weighted mean squared error over all quantized layers."""
        return float((self.layers.mse * self.layers.numel).sum() / self.layers.numel.sum())

    @property
    def type_fractions(self) -> dict:
        total = sum(self.type_counts.values())
        return {k: v / total for k, v in self.type_counts.items()} if total else {}

    def summary(self) -> str:
        c = self.config
        types = ", ".join(f"{k} {v:.1%}" for k, v in self.type_fractions.items())
        return (f"{c['dtype']}{c['bits']} g{c['group_size']}: {len(self.layers)} layers, "
                f"{int(self.layers.numel.sum()):,} weights, {self.bits_per_weight:.4f} bits/weight, "
                f"weight MSE {self.mse:.3e}, {self.seconds:.1f} s" + (f"; types: {types}" if types else ""))

    def __repr__(self) -> str:
        return f"QuantReport({self.summary()})"


def _untie_lm_head(model: nn.Module, lm_head: nn.Module) -> bool:
    """Give a tied lm_head its own weight so quantizing it leaves the input embedding in float."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or lm_head.weight is not emb.weight:
        return False
    lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
    # keep transformers from re-tying them (e.g. on save/load or resize)
    top = getattr(model, "config", None)
    text = top.get_text_config() if hasattr(top, "get_text_config") else None
    for cfg in (top, text):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


AWQ_ALPHAS = tuple(i / 20 for i in range(20))  # AWQ's grid: s = mean|x|^alpha, alpha in 0, 0.05, ..., 0.95


def _awq_scale(weights: list[torch.Tensor], stats, config: BitMoDConfig) -> tuple[torch.Tensor, float]:
    """AWQ's search: the per-input-channel scale s (one for all ``weights``, which read the same input) whose
    quantized ``Q(W s) / s`` gives the lowest summed output MSE on the sampled calibration inputs. As in AWQ the
    search quantizes by round to nearest; the clipping search comes after, on the chosen scale."""
    x = stats.sample.to(weights[0].device, torch.float32)
    refs = [x @ w.t() for w in weights]
    scales, errs = [], []
    for alpha in AWQ_ALPHAS:
        s = stats.abs_mean.to(x.device).pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        scales.append(s)
        errs.append(torch.stack([(x @ (quantize_tensor(w * s, config.bits, config.dtype, config.group_size,
                                                          config.chunk_elements, check=False).weight / s).t()
                                       - ref).pow(2).mean()
                                 for w, ref in zip(weights, refs)]))
    best = (None, float("nan"), float("inf"))
    # the errors read back once (each read is a GPU sync), then summed per alpha in double as before
    for s, alpha, per_layer in zip(scales, AWQ_ALPHAS, torch.stack(errs).tolist()):
        err = 0.0
        for e in per_layer:
            err += e
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1]


def _gptq_layers(targets, calibration, config: BitMoDConfig) -> dict:
    """GPTQ of every target, layers that read the same tensor (one Gram matrix) stacked into one call: GPTQ treats
    rows independently, so stacking q/k/v changes nothing but the per-column overhead (not NVFP, whose per-tensor
    scale is per layer)."""
    from .gptq import gptq_quantize

    batches: dict[int, list] = {}
    for name, module in targets:
        key = id(calibration[name].xtx) if config.dtype != "nvfp" else id(module)
        batches.setdefault(key, []).append((name, _weight_2d(module)))
    out = {}
    for members in batches.values():
        w = torch.cat([m for _, m in members]) if len(members) > 1 else members[0][1]
        res = gptq_quantize(w, calibration[members[0][0]].xtx.to(w.device), config.bits, config.dtype,
                            config.group_size, clip=config.clip)
        r0, per_row = 0, res.n_groups // w.shape[0]
        for name, m in members:
            r1 = r0 + m.shape[0]
            out[name] = TensorQuant(res.weight[r0:r1], None if res.type_ids is None else res.type_ids[r0:r1],
                                    per_row * m.shape[0])
            r0 = r1
    return out


def _check_finite(targets, calibration) -> None:
    """Every target's weight finite and (calibrated) its activation second moments finite and non-negative, in
    one host read for all layers; the error names the first bad layer."""
    oks = []
    for name, module in targets:
        w = _weight_2d(module)
        ok = torch.isfinite(w).all()
        if calibration is not None:
            cw = calibration[name].sq_mean
            ok = ok & (torch.isfinite(cw) & (cw >= 0)).all().to(ok.device)
        oks.append(ok.to(targets[0][1].weight.device))
    good = torch.stack(oks).tolist()
    for (name, _), g in zip(targets, good):
        if not g:
            raise ValueError(f"layer {name}: weight contains NaN or infinity"
                             + (" (or its calibration statistics are not finite and non-negative)"
                                if calibration is not None else ""))


def _weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view: transformers' Conv1D stores ``[in, out]``)."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.t()


def _unsupported_layers(model: nn.Module, supported: set[int], skip: tuple[str, ...]) -> list[str]:
    """Layers with a matrix weight that quantize_ does not handle (not Linear / Conv1D / an embedding)."""
    out = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (isinstance(w, nn.Parameter) and w.ndim >= 2 and id(module) not in supported
                and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and not any(s in name for s in skip)):
            out.append(f"{name} ({type(module).__name__})")
    return out


@torch.no_grad()
def quantize_(model: nn.Module, config: BitMoDConfig, calibration: dict | None = None) -> QuantReport:
    """Fake-quantize every ``nn.Linear`` / ``Conv1D`` weight of ``model`` in place; returns a ``QuantReport``.

    ``calibration`` (``calibrate.collect_activation_stats(model, windows)``) is required when
    ``config.calibration`` is "act", "awq" or "gptq" (the latter with ``hessian=True``). A layer with a matrix
    weight of another type (e.g. a convolution)
    is an error naming it, unless ``config.skip`` names it; ``report.skipped`` lists what stayed in float.
    """
    from .calibrate import quantizable_layers

    if not isinstance(config, BitMoDConfig):
        raise TypeError(f"config must be a BitMoDConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    layers = quantizable_layers(model)
    unsupported = _unsupported_layers(model, {id(m) for _, m in layers}, config.skip)
    if unsupported:
        raise ValueError(f"quantize_ handles nn.Linear and transformers' Conv1D, not {', '.join(unsupported)}; "
                         "leave them in float with BitMoDConfig(skip=(...))")
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets, skipped = [], []
    for name, module in layers:
        if any(s in name for s in config.skip) or (module is lm_head and not config.include_lm_head):
            skipped.append(name)
            continue
        targets.append((name, module))
    if not targets:
        raise ValueError("the model has no nn.Linear / Conv1D layers to quantize (after include_lm_head / skip)")
    skipped += [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    if config.calibration != "none":
        if calibration is None:
            raise ValueError(f"calibration={config.calibration!r} needs activation statistics: quantize_(model, "
                             "config, calibration=calibrate.collect_activation_stats(model, windows))")
        missing = [n for n, _ in targets if n not in calibration]
        if missing:
            raise ValueError(f"no calibration statistics for {len(missing)} layer(s): {', '.join(missing[:5])}")
        if config.calibration == "gptq" and any(getattr(calibration[n], "xtx", None) is None for n, _ in targets):
            raise ValueError("calibration='gptq' needs the input Gram matrices: "
                             "collect_activation_stats(model, windows, hessian=True)")
    untied = False
    if lm_head is not None and any(m is lm_head for _, m in targets):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and lm_head.weight is emb.weight:
            if not config.untie_embeddings:
                raise ValueError("lm_head is tied to the input embedding: quantizing it would quantize the "
                                 "embedding too. Use untie_embeddings=True or include_lm_head=False.")
            untied = _untie_lm_head(model, lm_head)

    _check_finite(targets, calibration if config.calibration != "none" else None)
    scales, alphas = {}, {}
    if config.calibration == "awq":  # one scale per group of layers reading the same tensor
        groups: dict[str, list] = {}
        for name, module in targets:
            groups.setdefault(calibration[name].group, []).append((name, module))
        for members in groups.values():
            ws = [_weight_2d(m).float() for _, m in members]
            s, alpha = _awq_scale(ws, calibration[members[0][0]], config)
            for name, _ in members:
                scales[name], alphas[name] = s, alpha

    gptq_done = _gptq_layers(targets, calibration, config) if config.calibration == "gptq" else {}
    names = candidate_names(config.dtype, config.bits)
    counts: Counter = Counter()
    rows, pending, code_bits, meta_bits, tensors = [], [], 0.0, 0.0, 0
    meta = metadata_bits_per_group(config.dtype, config.bits, config.accounting)
    for name, module in targets:
        w = _weight_2d(module)
        col_weight = calibration[name].sq_mean.to(w.device) if config.calibration != "none" else None
        if config.calibration == "gptq":
            res = gptq_done.pop(name)
        elif name in scales:
            s = scales[name].to(w.device)
            res = quantize_tensor(w.float() * s, config.bits, config.dtype, config.group_size, config.chunk_elements,
                                  clip=config.clip, col_weight=col_weight / s.pow(2), check=False)
            res.weight = (res.weight / s).to(w.dtype)
        else:
            res = quantize_tensor(w, config.bits, config.dtype, config.group_size, config.chunk_elements,
                                  clip=config.clip, col_weight=col_weight, check=False)
        # the layer's statistics stay on the device until all layers are done: one read-back (a GPU sync) in all
        diff = (res.weight.float() - w.float())
        stats = [diff.pow(2).mean(), w.float().pow(2).mean()]
        if col_weight is not None:  # the calibration-weighted error: mean over outputs of E[(dW x)^2] (diagonal)
            stats.append((diff.pow(2) * col_weight.float()).sum(1).mean())
        if res.type_ids is not None:  # groups per candidate type (bincount would sync for its output size)
            ids_flat = res.type_ids.flatten().long().unsqueeze(1)
            stats += list((ids_flat == torch.arange(len(names), device=w.device)).sum(0).unbind())
        pending.append(torch.stack([t.to(torch.float64) for t in stats]))
        rows.append({"layer": name, "rows": w.shape[0], "cols": w.shape[1], "numel": w.numel(), "groups": res.n_groups})
        w.copy_(res.weight)  # a view of the parameter: writes through (transposed back for Conv1D)
        code_bits += config.bits * w.numel()
        if config.dtype in _KQUANT_BITS:  # exact, a short last super-block included
            from .kquants import kquant_bits

            meta_bits += w.shape[0] * kquant_bits(config.dtype, w.shape[1]) - config.bits * w.numel()
        else:
            meta_bits += meta * res.n_groups
        tensors += 1
    if config.dtype == "nvfp":
        meta_bits += NVFP_TENSOR_SCALE_BITS * tensors
    flat, i = torch.cat(pending).tolist(), 0  # the one read-back of every layer's statistics
    for k, (part, r) in enumerate(zip(pending, rows)):
        vals, i = flat[i:i + len(part)], i + len(part)
        mse, power, rest = vals[0], vals[1], vals[2:]
        row = {"layer": r["layer"], "rows": r["rows"], "cols": r["cols"], "numel": r["numel"], "mse": mse,
               "rel_mse": mse / power if power > 0 else float("nan"), "groups": r["groups"]}
        if config.calibration != "none":
            row["act_mse"], rest = rest[0], rest[1:]
        if r["layer"] in alphas:
            row["awq_alpha"] = alphas[r["layer"]]
        for n, c in zip(names, rest):
            row[n] = int(c)
            counts[n] += int(c)
        rows[k] = row
    layers_df = pd.DataFrame(rows)
    total = float(layers_df.numel.sum())
    report = QuantReport(
        config=asdict(config),
        layers=layers_df,
        type_counts={n: int(counts[n]) for n in names},
        bits_per_weight=(code_bits + meta_bits) / total,
        nominal_bits_per_weight=bits_per_weight(config.dtype, config.bits, config.group_size, config.accounting),
        seconds=time.perf_counter() - start,
        untied_lm_head=untied,
        skipped=skipped,
    )
    if config.packed:
        from .packed import pack_

        pack_(model, report)
    return report


# ------------------------------------------------------------------------------------------ synthetic groups
DISTRIBUTIONS = ("gaussian", "laplace", "student_t3")


def synthetic_groups(dist: str, n_groups: int = 4096, group_size: int = 128, seed: int = 0) -> torch.Tensor:
    """``[n_groups, group_size]`` i.i.d. samples: standard Gaussian, Laplace or Student-t with 3 dof."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n_groups, group_size)
    if dist == "gaussian":
        return torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    if dist == "laplace":
        u = u.clamp(1e-12, 1 - 1e-12) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if dist == "student_t3":
        z = torch.randn(shape, generator=gen)
        chi2 = torch.randn((3, *shape), generator=gen).pow(2).sum(0)
        return z / torch.sqrt(chi2 / 3)
    raise ValueError(f"unknown distribution {dist!r}; expected one of {', '.join(DISTRIBUTIONS)}")


def group_mse(x: torch.Tensor, bits: int, dtype: str, group_size: int | None = None) -> float:
    """Mean squared error of quantizing the rows of ``x`` (each row one or more groups)."""
    q = quantize_tensor(x, bits, dtype, group_size or x.shape[-1]).weight
    return float((q - x).pow(2).mean())


def relative_mse_table(dtypes=("int", "fp", "er", "ea", "ant", "olive", "bitmod"), bits=(3, 4),
                       dists=DISTRIBUTIONS, n_groups: int = 4096, group_size: int = 128, seed: int = 0,
                       reference: str = "int_asym") -> pd.DataFrame:
    """MSE of each type on synthetic groups, absolute and relative to ``reference`` at the same bits."""
    rows = []
    for dist in dists:
        x = synthetic_groups(dist, n_groups, group_size, seed)
        for b in bits:
            ref = group_mse(x, b, reference, group_size)
            for d in dict.fromkeys((reference, *dtypes)):
                if d == "flint" and b != 4:
                    continue
                m = group_mse(x, b, d, group_size)
                rows.append({"distribution": dist, "bits": b, "dtype": d, "mse": m, "relative_mse": m / ref})
    return pd.DataFrame(rows)
