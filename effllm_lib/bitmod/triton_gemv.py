"""A Triton weight-only GEMV/GEMM for the packed BitMoD weight (``packed.py``): batch 1 to 64 tokens.

    y = bitmod_linear_triton(x, packed, bias)          # x [..., in_features] on the GPU, bf16/fp16/fp32

Each program owns ``block_n`` output rows and a range of groups (``split_k`` ranges in all, summed with FP32
atomics when > 1). Per group it loads the codes of its rows (one byte holds two 4-bit codes; 3-bit codes come
from a 2-bit plane and a 1-bit plane), decodes each code in registers - the sign-magnitude FP code's
magnitude by a shift, the -0 code replaced by the group's special value, which the 2-bit type id selects -
multiplies by the group's scale in FP32 and rounds to the weight's dtype: exactly the fake-quantized weight.
That is the "per-group lookup table" without a table in memory: the four types differ in one code only.
Up to 8 tokens it multiplies and reduces in FP32 registers (GEMV); from 9 tokens on it uses ``tl.dot`` with
FP32 accumulation.

Triton is optional (not a dependency of the library): ``triton_available()`` says whether it imports. On a
machine without a GPU, ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (slowly) for the tests.
Group sizes must be powers of two >= 64 here (the CPU kernels take any).
"""

from __future__ import annotations

import os

import torch

from .packed import PackedBitMoD

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _round_bf16_bits(v):
        """fp32 -> the nearest bf16 (ties to even), still as fp32, by integer ops (finite inputs)."""
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def _decode(code, t, scale, BITS: tl.constexpr, OUT_DTYPE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        """code (int32, sign-magnitude FP), t (type id), scale (fp32) -> weight rounded to OUT_DTYPE."""
        sign = 1 << (BITS - 1)
        m = code & (sign - 1)
        if BITS == 4:
            big = (2 + (m & 1)) << tl.maximum((m >> 1) - 1, 0)      # E2M1 x2: 2,3,4,6,8,12
            special = tl.where(t >= 2, 16.0, 10.0)
        else:
            big = 2 << tl.maximum(m - 2, 0)                          # E2M0 x2: 2,4
            special = tl.where(t >= 2, 6.0, 3.0)
        mag = tl.where(m < 2, m, big).to(tl.float32)
        special = tl.where((t & 1) == 1, -special, special)
        value = tl.where(code == sign, special, tl.where((code & sign) != 0, -mag, mag))
        w = value * scale
        if BF16_BY_BITS:  # Triton's interpreter truncates fp32 -> bf16; the GPU rounds to nearest even
            w = _round_bf16_bits(w)
        return w.to(OUT_DTYPE)

    @triton.jit
    def _accumulate(acc, code, pos, t, s, g, toks, tok_ok, x_ptr, stride_xm, K, GROUP: tl.constexpr,
                    BITS: tl.constexpr, W_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, IN_PREC: tl.constexpr,
                    BF16_BY_BITS: tl.constexpr):
        """acc[BLOCK_M, BLOCK_N] += x[:, columns of pos] . decoded weights [BLOCK_N, width]."""
        w = _decode(code, t[:, None], s[:, None], BITS, W_DTYPE, BF16_BY_BITS)
        col = g * GROUP + pos
        x_ok = tok_ok[:, None] & (col < K)[None, :]
        xb = tl.load(x_ptr + toks[:, None] * stride_xm + col[None, :], mask=x_ok, other=0.0)
        wx = w.to(xb.dtype)
        if USE_DOT:
            acc += tl.dot(xb, tl.trans(wx), out_dtype=tl.float32, input_precision=IN_PREC)
        else:
            acc += tl.sum(xb.to(tl.float32)[:, None, :] * wx.to(tl.float32)[None, :, :], axis=2)
        return acc

    @triton.jit
    def _bitmod_kernel(x_ptr, codes_ptr, scales_ptr, types_ptr, out_ptr,
                       M, N, K, n_groups, stride_xm, groups_per_split,
                       BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       USE_DOT: tl.constexpr, IN_PREC: tl.constexpr, W_DTYPE: tl.constexpr,
                       SPLIT_K: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        tok_ok = toks < M
        gbytes = GROUP * BITS // 8
        row_bytes = n_groups * gbytes
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g0 = pid_k * groups_per_split
        g1 = tl.minimum(g0 + groups_per_split, n_groups)
        for g in range(g0, g1):
            t = (tl.load(types_ptr + rows * ((n_groups + 3) // 4) + g // 4, mask=row_ok, other=0).to(tl.int32)
                 >> (2 * (g % 4))) & 3
            s = tl.load(scales_ptr + rows * n_groups + g, mask=row_ok, other=0).to(tl.float32)
            base = codes_ptr + rows[:, None] * row_bytes + g * gbytes
            if BITS == 4:
                HALF: tl.constexpr = GROUP // 2
                j = tl.arange(0, HALF)
                b = tl.load(base + j[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
                acc = _accumulate(acc, b & 15, j, t, s, g, toks, tok_ok, x_ptr, stride_xm, K, GROUP, BITS,
                                  W_DTYPE, USE_DOT, IN_PREC, BF16_BY_BITS)
                acc = _accumulate(acc, b >> 4, HALF + j, t, s, g, toks, tok_ok, x_ptr, stride_xm, K, GROUP, BITS,
                                  W_DTYPE, USE_DOT, IN_PREC, BF16_BY_BITS)
            else:
                Q: tl.constexpr = GROUP // 4
                j = tl.arange(0, Q)
                b = tl.load(base + j[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
                bit = (j % 8)[None, :]
                for k in tl.static_range(4):
                    hi = tl.load(base + Q + (k * Q + j[None, :]) // 8, mask=row_ok[:, None], other=0).to(tl.int32)
                    code = ((b >> (2 * k)) & 3) | (((hi >> bit) & 1) << 2)
                    acc = _accumulate(acc, code, k * Q + j, t, s, g, toks, tok_ok, x_ptr, stride_xm, K, GROUP,
                                      BITS, W_DTYPE, USE_DOT, IN_PREC, BF16_BY_BITS)
        out_ptrs = out_ptr + toks[:, None] * N + rows[None, :]
        ok = tok_ok[:, None] & row_ok[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(out_ptrs, acc, mask=ok)
        else:
            tl.store(out_ptrs, acc, mask=ok)


_TL_DTYPE = {}
if tl is not None:
    _TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

MAX_TOKENS = 64


def default_config(m: int, n: int, n_groups: int) -> dict:
    """A starting point, not a tuned choice: the benchmark sweeps ``block_n``, ``split_k`` and ``num_warps``."""
    # up to 8 tokens: FP32 multiply-reduce over a power-of-two token block; from 9: tl.dot blocks of 16..64
    block_m = triton.next_power_of_2(m) if m <= 8 else min(64, max(16, triton.next_power_of_2(m)))
    block_n = 32 if m <= 8 else 64
    split_k = max(1, min(8, n_groups // 8, 264 // max(1, triton.cdiv(n, block_n))))
    return {"block_m": block_m, "block_n": block_n, "split_k": split_k, "num_warps": 4}


def bitmod_linear_triton(x: torch.Tensor, p: PackedBitMoD, bias: torch.Tensor | None = None,
                         config: dict | None = None) -> torch.Tensor:
    """``x @ dequantize(p).T + bias`` with the Triton kernel; returned in ``x.dtype``."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install triton; it is optional)")
    if x.shape[-1] != p.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {p.in_features}")
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    gs = p.group_size
    if gs < 64 or gs & (gs - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two group size >= 64, got {gs} (use the CPU kernels)")
    if x.device != p.codes.device:
        raise ValueError(f"x is on {x.device}, the weight on {p.codes.device}")
    x2 = x.reshape(-1, p.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], p.out_features
    if m > MAX_TOKENS:  # prefill-sized inputs: in chunks of 64 tokens (a GEMM kernel would tile differently)
        return torch.cat([bitmod_linear_triton(x2[i:i + MAX_TOKENS], p, bias, config)
                          for i in range(0, m, MAX_TOKENS)]).view(*x.shape[:-1], n)
    cfg = {**default_config(m, n, p.n_groups), **(config or {})}
    split_k = cfg["split_k"]
    out = (torch.zeros if split_k > 1 else torch.empty)(m, n, dtype=torch.float32, device=x.device)
    groups_per_split = triton.cdiv(p.n_groups, split_k)
    grid = (triton.cdiv(n, cfg["block_n"]), triton.cdiv(m, cfg["block_m"]), split_k)
    _bitmod_kernel[grid](x2, p.codes, p.scales, p.type_ids, out, m, n, p.in_features, p.n_groups, x2.stride(0),
                         groups_per_split, BITS=p.bits, GROUP=gs, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                         USE_DOT=cfg["block_m"] >= 16, IN_PREC="ieee" if x.dtype == torch.float32 else "tf32",
                         W_DTYPE=_TL_DTYPE[p.dtype],
                         SPLIT_K=split_k, BF16_BY_BITS=p.dtype == torch.bfloat16 and _interpreting(),
                         num_warps=cfg["num_warps"])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], n)
