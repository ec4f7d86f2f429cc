"""llama.cpp's k-quants Q4_K and Q3_K (the reference quantizers, no importance matrix), written from the
description of ``quantize_row_q4_K_ref`` / ``quantize_row_q3_K_ref`` in ggml-quants.c, vectorized over blocks.

* Q4_K: super-blocks of 256 = 8 sub-blocks of 32. Per sub-block an asymmetric 4-bit fit ``x ~ scale * q - min``
  (``make_qkx2_quants``: weights ``sqrt(mean x^2) + |x|``, min clamped to <= 0, 21 candidate ranges, weighted
  least squares for scale and min); the 8 scales and 8 mins are quantized to 6 bits against the super-block's
  largest (FP16 ``d`` = max/63, ``dmin`` = max min/63), then the codes re-rounded with those. 144 bytes per
  256 weights = 4.5 bits/weight.
* Q3_K: super-blocks of 256 = 16 sub-blocks of 16. Per sub-block a symmetric 3-bit fit (codes -4..3,
  ``make_q3_quants`` with its x^2-weighted coordinate-descent refinement); the 16 signed scales quantized to
  6 bits (-32..31) against the one of largest magnitude (FP16 ``d``), codes re-rounded. 110 bytes per 256
  weights = 3.4375 bits/weight.

``q4_k`` / ``q3_k`` return the dequantized weights exactly as llama.cpp's dequantizer computes them from the
stored bytes (float32 ``d * sc * q - dmin * m`` / ``d * sc * q``); ``pack_q4_k`` / ``pack_q3_k`` give those
bytes (the GGUF block layout), which the tests dequantize with the ``gguf`` package. A row whose length is not a
multiple of 256 (SmolLM2's 576 = 2 x 256 + 64) ends in a short super-block (its sub-blocks only; packed, it is
padded with zero sub-blocks, which change nothing). llama.cpp itself would store such a tensor in a fallback
type (Q5_0 for Q4_K); we keep the k-quant grid so the comparison is of the format, and count the short block's
bits exactly (``kquant_bits``).
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
SUB = {"q4_k": 32, "q3_k": 16}
BLOCK_BYTES = {"q4_k": 144, "q3_k": 110}


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def kquant_bits(kind: str, cols: int) -> int:
    """Storage bits of one row of ``cols`` weights: codes, the 6-bit sub-block scales (and mins), and the FP16
    super-block scale(s) of every (possibly short) super-block."""
    if kind not in SUB:
        raise ValueError(f"unknown k-quant {kind!r}; expected q4_k or q3_k")
    if cols % SUB[kind]:
        raise ValueError(f"{kind}: row length {cols} is not a multiple of the sub-block size {SUB[kind]}")
    subs, supers = cols // SUB[kind], -(-cols // QK_K)
    if kind == "q4_k":
        return 4 * cols + 12 * subs + 32 * supers
    return 3 * cols + 6 * subs + 16 * supers


# ------------------------------------------------------------------------------------------------------ Q4_K
def _qkx2(x: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1, nstep: int = 20):
    """make_qkx2_quants over the last dim (one sub-block per row): (scale, the_min >= 0), x ~ scale * L - the_min."""
    w = torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + x.abs()
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    span = hi - lo
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    sum_w, sum_x = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    iscale = nmax / span
    scale = 1 / iscale
    L = torch.round(iscale * (x - lo)).clamp(0, nmax)
    best = (w * (scale * L + lo - x).pow(2)).sum(-1, keepdim=True)
    mn = lo
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        la = torch.round(iscale * (x - lo)).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * la).sum(-1, keepdim=True), (w * la * la).sum(-1, keepdim=True), \
            (w * la * x).sum(-1, keepdim=True)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        mad = (w * (this_scale * la + this_min - x).pow(2)).sum(-1, keepdim=True)
        better = ok & (mad < best)
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.squeeze(-1), (-mn).squeeze(-1)


def _q4_k_params(x: torch.Tensor):
    """x [N, n] (n a multiple of 32, at most 256): (d16, dmin16 [N], ls, lm [N, n/32] 6-bit, L [N, n] codes)."""
    n = x.shape[-1]
    sub = x.unflatten(-1, (n // 32, 32))
    scales, mins = _qkx2(sub)
    max_scale, max_min = scales.amax(-1, keepdim=True).clamp(min=0), mins.amax(-1, keepdim=True).clamp(min=0)
    inv_s = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)), 0.0)
    inv_m = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)), 0.0)
    ls = torch.round(inv_s * scales).clamp(0, 63)
    lm = torch.round(inv_m * mins).clamp(0, 63)
    d16, dmin16 = _fp16(max_scale / 63), _fp16(max_min / 63)
    d = d16 * ls  # [N, subs]
    dm = dmin16 * lm
    safe = torch.where(d != 0, d, torch.ones_like(d))
    L = torch.round((sub + dm.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, 15)
    L = torch.where((d != 0).unsqueeze(-1), L, torch.zeros_like(L))  # d = 0: every code dequantizes to -dm
    return d16.squeeze(-1), dmin16.squeeze(-1), ls, lm, L.flatten(-2)


def q4_k(x: torch.Tensor) -> torch.Tensor:
    """Q4_K fake quantization of the rows of x [..., n] (one super-block each, n a multiple of 32, <= 256)."""
    xf = x.reshape(-1, x.shape[-1]).float()
    d16, dmin16, ls, lm, L = _q4_k_params(xf)
    d, dm = (d16.unsqueeze(-1) * ls).unsqueeze(-1), (dmin16.unsqueeze(-1) * lm).unsqueeze(-1)
    out = d * L.unflatten(-1, (ls.shape[-1], 32)) - dm
    return out.flatten(-2).reshape(x.shape).to(x.dtype)


# ------------------------------------------------------------------------------------------------------ Q3_K
def _q3(x: torch.Tensor, nmax: int = 4, tries: int = 5):
    """make_q3_quants(do_rmse) over the last dim (16 per row): (signed scale, codes L in -nmax..nmax-1)."""
    amax, arg = x.abs().max(-1, keepdim=True)  # first of equal magnitudes, as the C loop's strict '>'
    mx = x.gather(-1, arg)
    live = amax > 0
    iscale = -nmax / torch.where(live, mx, torch.ones_like(mx))
    L = torch.round(iscale * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = (w * x * L).sum(-1), (w * L * L).sum(-1)
    for _ in range(tries):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[-1]):  # the C code's coordinate descent is sequential within a sub-block
            xi, wi, li = x[..., i], w[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = torch.round(xi * sl2 / torch.where(slx > 0, slx, torch.ones_like(slx))).clamp(-nmax, nmax - 1)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[..., i] = torch.where(take, new, li)
            sumlx, suml2 = torch.where(take, slx2, sumlx), torch.where(take, sl22, suml2)
            changed |= take
        if not changed.any():
            break
    scale = torch.where(live.squeeze(-1), sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), 0.0)
    return scale, L


def _q3_k_params(x: torch.Tensor):
    """x [N, n] (n a multiple of 16, <= 256): (d16 [N], l [N, n/16] 6-bit scale codes 0..63, L [N, n] in 0..7)."""
    n = x.shape[-1]
    sub = x.unflatten(-1, (n // 16, 16))
    scales, L0 = _q3(sub)
    _, arg = scales.abs().max(-1, keepdim=True)
    max_scale = scales.gather(-1, arg)
    live = max_scale != 0
    iscale = -32 / torch.where(live, max_scale, torch.ones_like(max_scale))
    l = torch.where(live, torch.round(iscale * scales).clamp(-32, 31) + 32, torch.zeros_like(scales))
    d16 = torch.where(live, _fp16(1 / iscale), torch.zeros_like(iscale))
    d = d16 * (l - 32)
    safe = torch.where(d != 0, d, torch.ones_like(d))
    L = torch.round(sub / safe.unsqueeze(-1)).clamp(-4, 3) + 4
    L = torch.where((d != 0).unsqueeze(-1), L, L0 + 4)  # d = 0: llama.cpp keeps make_q3_quants' codes
    return d16.squeeze(-1), l, L.flatten(-2)


def q3_k(x: torch.Tensor) -> torch.Tensor:
    """Q3_K fake quantization of the rows of x [..., n] (one super-block each, n a multiple of 16, <= 256)."""
    xf = x.reshape(-1, x.shape[-1]).float()
    d16, l, L = _q3_k_params(xf)
    dl = (d16.unsqueeze(-1) * (l - 32)).unsqueeze(-1)
    out = dl * (L.unflatten(-1, (l.shape[-1], 16)) - 4)
    return out.flatten(-2).reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------------- packing
def _pad(x: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [rows * blocks, 256]: each row cut into super-blocks, the last padded with zeros."""
    rows, cols = x.shape
    blocks = -(-cols // QK_K)
    out = torch.zeros(rows, blocks * QK_K, dtype=torch.float32)
    out[:, :cols] = x.float()
    return out.reshape(rows * blocks, QK_K)


def pack_q4_k(x: torch.Tensor) -> np.ndarray:
    """The GGUF bytes (block_q4_K: d, dmin, scales[12], qs[128]) of a [rows, cols] weight, rows padded to
    whole super-blocks; uint8 [rows * blocks, 144]."""
    d16, dmin16, ls, lm, L = _q4_k_params(_pad(x))
    ls, lm, L = ls.to(torch.uint8).numpy(), lm.to(torch.uint8).numpy(), L.to(torch.uint8).numpy()
    n = len(L)
    sc = np.zeros((n, 12), np.uint8)
    sc[:, 0:4] = ls[:, 0:4]
    sc[:, 4:8] = lm[:, 0:4]
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    q = L.reshape(n, 4, 2, 32)  # chunks of 64: low nibble the first 32, high nibble the next 32
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    d = d16.numpy().astype(np.float16).view(np.uint8).reshape(n, 2)
    dmin = dmin16.numpy().astype(np.float16).view(np.uint8).reshape(n, 2)
    return np.concatenate([d, dmin, sc, qs], 1)


def pack_q3_k(x: torch.Tensor) -> np.ndarray:
    """The GGUF bytes (block_q3_K: hmask[32], qs[64], scales[12], d) of a [rows, cols] weight, rows padded to
    whole super-blocks; uint8 [rows * blocks, 110]."""
    d16, l, L = _q3_k_params(_pad(x))
    l, L = l.to(torch.uint8).numpy(), L.to(torch.uint8).numpy()
    n = len(L)
    high = (L > 3).astype(np.uint8)
    low = L - 4 * high
    # bit b of hmask[m] is the high bit of code 32 b + m
    hmask = (high.reshape(n, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(1).astype(np.uint8)
    q = low.reshape(n, 2, 4, 32)  # per 128: four 2-bit fields of 32 codes each
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    sc = np.zeros((n, 12), np.uint8)
    sc[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    hi = l >> 4  # [n, 16], 2 bits each: scale j goes to byte 8 + j % 4, bits 2 (j // 4)
    for j in range(16):
        sc[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    d = d16.numpy().astype(np.float16).view(np.uint8).reshape(n, 2)
    return np.concatenate([hmask, qs, sc, d], 1)
