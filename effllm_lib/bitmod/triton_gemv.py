"""A Triton weight-only GEMV/GEMM for the packed BitMoD weight (``packed.py``), any number of tokens.

    y = bitmod_linear_triton(x, packed, bias)          # x [..., in_features] on the GPU, bf16/fp16/fp32

At batch 1 a weight-only kernel must stream the packed weight at HBM speed while spending only a few
instructions per weight: the H200 issues 132 SMs x 4 schedulers x 32 lanes ~ 3.4e13 thread-instructions/s
against ~4.3e12 bytes/s of HBM read, i.e. about 4 instructions per 4-bit weight before the issue rate, not the
memory, is the limit. So the kernel is built to be cheap per weight and to keep many loads in flight:

* No loop: each program owns ``BLOCK_N`` output rows x ``GROUPS_PER_PROG`` groups (split-K over the whole
  input dimension, thousands of programs), loads its whole tile up front and adds its partial sums to an FP32
  output with atomics. Rows past the end are clamped (every load unmasked); groups past the end get scale 0.
* Decode without a table in memory: a 4-bit code is a sign-magnitude FP4 E2M1 code (x2), so moving its three
  magnitude bits to the low exponent / top mantissa bits of a float and its sign to the sign bit gives the
  value times a power of two exactly: FP32 bits 22-24 and 31 (value x 2^-127; code 1 lands on an FP32
  subnormal, which FFMA keeps) in the batch-1 path, FP16 bits 9-11 and 15 (value x 2^-15) in the tl.dot path;
  3-bit codes go to the exponent alone (x 2^-126 / 2^-14). The only code whose meaning depends on the group's
  data type, -0, is swapped for the type's special value by one compare and one select per weight: that is the
  per-group "lookup table" in registers.
* Batch-1 path (``USE_DOT=False``): the codes are read as int32 words (word q of a 4-bit group holds codes
  4q..4q+3 in its low nibbles and G/2+4q.. in its high nibbles), one lane per code position; each nibble's sign
  is first copied next to its magnitude so that one shift and one mask give its FP32 pattern. Activations are
  scaled by 2^100 to keep the products normal; FP32 multiply-add; the group's scale applied once per group to
  the partial sums (as BitMoD's own PE does). This path multiplies by value x scale unrounded, not by the weight
  rounded to its dtype (at most half an ulp of the weight dtype apart per weight). Compiled for sm_90 it spends
  about 8 SASS instructions per weight: at H200 rates that, not HBM bandwidth, is the limit.
* Batch > 1 path (``USE_DOT=True``), a GEMM: each program decodes each of its groups once, in column order
  (4 bits: the low, then the high nibbles of the group's G/2 bytes are two contiguous runs of G/2 columns; 3
  bits: the four 2-bit fields of its G/4 plane bytes, four runs of G/4), to the exact code values (the FP16
  pattern's value x 2^-15 is a normal bf16; for fp16 activations scaled back to -16..16), and runs one
  ``tl.dot`` (FP32 accumulation) per run against the activations' matching columns; the group's scale
  multiplies the dot's result, as in the batch-1 path (so both paths multiply by value x scale unrounded).
  ``SWAP_AB`` computes value . x^T (weight rows as the MMA's M dimension, at least 64 on Hopper's wgmma, tokens
  as its N): the decoded weight is then the register operand and only the small activation tile is staged in
  shared memory. Split-K over groups with FP32 atomics, as the batch-1 path.

``bitmod_linear_triton`` autotunes tile sizes per (token bucket, shape) with ``triton.autotune`` on first use
(``config=`` pins one). Triton is optional: ``triton_available()`` says whether it imports; without a GPU,
``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (slowly) for the tests. Group sizes must be powers of
two >= 64 (the CPU kernels take any).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

import torch

from .packed import SPECIAL_VALUES, PackedBitMoD

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


# value x 2^-UNIT is what the FP16 bit pattern of a code holds (tl.dot path), value x 2^-UNIT32 its FP32 pattern
# (batch-1 path, whose activations are scaled by 2^X_LOG2 so that the products stay normal FP32 numbers)
UNIT_LOG2 = {4: 15, 3: 14}
UNIT32_LOG2 = {4: 127, 3: 126}
X_LOG2 = 100


def _fp16_bits(value: float) -> int:
    bits = int(torch.tensor(value, dtype=torch.float16).view(torch.int16).item()) & 0xFFFF
    if float(torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.float16)) != value:
        raise AssertionError(f"{value} is not exact in FP16")
    return bits


@lru_cache(maxsize=2)
def special_patterns(bits: int) -> tuple[int, int]:
    """FP16 bit patterns of the positive ER and EA special values x 2^-UNIT (the sign is bit 15)."""
    er, _, ea, _ = SPECIAL_VALUES[bits]
    return _fp16_bits(er * 2.0 ** -UNIT_LOG2[bits]), _fp16_bits(ea * 2.0 ** -UNIT_LOG2[bits])


@lru_cache(maxsize=2)
def special_patterns32(bits: int) -> tuple[int, int]:
    """FP32 bit patterns of the positive ER and EA special values x 2^-UNIT32 (normal numbers; sign is bit 31)."""
    er, _, ea, _ = SPECIAL_VALUES[bits]
    out = []
    for value in (er, ea):
        v = torch.tensor(value * 2.0 ** -UNIT32_LOG2[bits], dtype=torch.float64).float()
        if float(v) * 2.0 ** UNIT32_LOG2[bits] != value or float(v) < torch.finfo(torch.float32).tiny:
            raise AssertionError(f"{value} x 2^-{UNIT32_LOG2[bits]} is not an exact normal FP32 number")
        out.append(int(v.view(torch.int32).item()))
    return tuple(out)


if triton is not None:

    @triton.jit
    def _shift(v, n: tl.constexpr):
        """v << n for n >= 0, else v >> -n (arithmetic: callers mask the bits they keep)."""
        if n >= 0:
            r = v << n
        else:
            r = v >> (-n)
        return r

    @triton.jit
    def _value(h, special):
        """FP16 bit pattern (int32, low 16 bits) -> fp32 value x 2^-UNIT; the -0 code becomes the group's
        special value (``special``: its pattern, sign included)."""
        h = tl.where(h == 0x8000, special, h)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _value32(h, special):
        """FP32 bit pattern -> value x 2^-UNIT32; the -0 code (INT32_MIN) becomes the group's special value."""
        return tl.where(h == -2147483648, special, h).to(tl.float32, bitcast=True)

    @triton.jit
    def _group_meta(scales_ptr, types_ptr, rows_c, g, n_groups, type_stride):
        """Per row of the tile, for group g: the clamped group index, the scale in fp32 (0 past the last group)
        and the type id (ER+ ER- EA+ EA- = 0..3)."""
        gc = tl.minimum(g, n_groups - 1)
        s = tl.load(scales_ptr + rows_c * n_groups + gc).to(tl.float32)
        s = tl.where(g < n_groups, s, 0.0)
        tb = tl.load(types_ptr + rows_c * type_stride + gc // 4).to(tl.int32)
        return gc, s, (tb >> (2 * (gc % 4))) & 3

    @triton.jit
    def _load_x(ptrs, col, K, EVEN_K: tl.constexpr):
        if EVEN_K:  # columns come from clamped groups: always in bounds
            xv = tl.load(ptrs)
        else:
            xv = tl.load(ptrs, mask=col < K, other=0.0)
        return xv.to(tl.float32)

    @triton.jit
    def _pattern4(w, S: tl.constexpr):
        """FP16 pattern of the 4-bit code at bit S of the int32 words w: magnitude bits to 9-11, sign to 15."""
        return (_shift(w, 9 - S) & 0x0E00) | (_shift(w, 12 - S) & 0x8000)

    @triton.jit
    def _pattern3(w, sw, first, b: tl.constexpr, k: tl.constexpr):
        """FP16 pattern of the 3-bit codes first + b (first = 4q + kQ): the 2-bit field at bit 8b + 2k of the
        plane word w to bits 10-11, the sign (bit (first % 32) + b of the sign word sw) to 15."""
        sign = ((sw >> ((first % 32) + b)[None, :]) << 15) & 0x8000
        return (_shift(w, 10 - (8 * b + 2 * k)) & 0x0C00) | sign

    @triton.jit
    def _sign_words(codes32_ptr, wrow, rows_c, row_words, gc, first, k: tl.constexpr, WPG: tl.constexpr,
                    NW: tl.constexpr, Q: tl.constexpr):
        """3 bits: the sign-plane words for codes 4q + b + kQ, i.e. word (4q + kQ) // 32 of the group's plane."""
        if Q <= 32:   # one word per row
            sw = tl.load(codes32_ptr + rows_c * row_words + gc * WPG + NW + (k * Q) // 32)[:, None]
        else:
            sw = tl.load(wrow + NW + (first // 32)[None, :])
        return sw

    @triton.jit
    def _dot_codes(part, h, special, x_ptr, toks, tok_ok, stride_xm, col, K, UNIT: tl.constexpr,
                   IN_PREC: tl.constexpr, SWAP_AB: tl.constexpr, X_FP16: tl.constexpr):
        """part += x[:, col] . value[rows, col] for one run of columns of one group (no scale: the caller
        scales the group's partial sums). The FP16 pattern's value x 2^-UNIT is exact in bf16 and fp32 (normal
        numbers); for fp16 operands it is scaled back to the plain value (-16..16), off FP16's subnormal range.
        SWAP_AB computes part^T = value . x^T [rows, tokens] instead: the decoded weight is then the register
        operand of the MMA and only the small activation tile goes through shared memory."""
        xb = tl.load(x_ptr + toks[:, None] * stride_xm + col[None, :], mask=tok_ok[:, None] & (col < K)[None, :],
                     other=0.0)
        wv = _value(h, special)
        if X_FP16:
            wv = wv * UNIT
        wq = wv.to(xb.dtype)
        if SWAP_AB:
            part += tl.dot(wq, tl.trans(xb), out_dtype=tl.float32, input_precision=IN_PREC)
        else:
            part += tl.dot(xb, tl.trans(wq), out_dtype=tl.float32, input_precision=IN_PREC)
        return part

    # M and the token bucket unspecialized: one compiled kernel serves every token count of a path
    @triton.jit(do_not_specialize=["M", "m_bucket"])
    def _bitmod_kernel(x_ptr, codes32_ptr, codes8_ptr, scales_ptr, types_ptr, out_ptr,
                       M, N, K, n_groups, stride_xm, row_words, type_stride, m_bucket,
                       BITS: tl.constexpr, GROUP: tl.constexpr, UNIT: tl.constexpr,
                       ER_PAT: tl.constexpr, EA_PAT: tl.constexpr, UNIT32: tl.constexpr, X_SCALE: tl.constexpr,
                       ER32: tl.constexpr, EA32: tl.constexpr, EVEN_K: tl.constexpr,
                       IN_PREC: tl.constexpr, X_FP16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_PROG: tl.constexpr,
                       USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr):
        # m_bucket: only the autotuner's key (a token-count bucket), unused here
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows_c = tl.minimum(rows, N - 1)          # clamped: the weight stream needs no masks
        WPG: tl.constexpr = GROUP * BITS // 32    # int32 words per group and row
        NW: tl.constexpr = GROUP * (BITS - 2) // 16   # words read per lane: 4 bits all G/8; 3 bits the 2-bit plane
        Q: tl.constexpr = GROUP // 4              # 3 bits: codes per 2-bit field position
        q = tl.arange(0, NW)
        if USE_DOT:
            # ---- BLOCK_M tokens: each group's codes decoded once to exact values (no scale), one tl.dot per
            # contiguous run of columns (4 bits: the low and the high nibbles of the group's G/2 bytes; 3 bits:
            # the four 2-bit fields of its G/4 plane bytes), the group's scale applied to the dot's FP32 result
            toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            tok_ok = toks < M
            if SWAP_AB:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for gi in tl.static_range(GROUPS_PER_PROG):
                gc, s, t = _group_meta(scales_ptr, types_ptr, rows_c, pid_k * GROUPS_PER_PROG + gi, n_groups,
                                       type_stride)
                special = (tl.where(t >= 2, EA_PAT, ER_PAT) | ((t & 1) << 15))[:, None]   # FP16 pattern
                brow = codes8_ptr + rows_c[:, None] * (row_words * 4) + gc * (WPG * 4)
                if SWAP_AB:
                    part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                else:
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if BITS == 4:   # byte j: code j (low nibble), code G/2 + j (high nibble)
                    j = tl.arange(0, GROUP // 2)
                    byte = tl.load(brow + j[None, :]).to(tl.int32)
                    for hi in tl.static_range(2):
                        part = _dot_codes(part, _pattern4(byte, 4 * hi), special, x_ptr, toks, tok_ok, stride_xm,
                                          gc * GROUP + hi * (GROUP // 2) + j, K, UNIT, IN_PREC, SWAP_AB, X_FP16)
                else:   # plane byte j: codes j + kQ in bits 2k..2k+1; code i's sign: bit i % 32 of sign word i // 32
                    j = tl.arange(0, Q)
                    byte = tl.load(brow + j[None, :]).to(tl.int32)
                    wrow = codes32_ptr + rows_c[:, None] * row_words + gc * WPG + Q // 4
                    for k in tl.static_range(4):
                        first = k * Q + j
                        sw = tl.load(wrow + (first // 32)[None, :])
                        h = (((byte >> (2 * k)) & 3) << 10) | (((sw >> (first % 32)[None, :]) & 1) << 15)
                        part = _dot_codes(part, h, special, x_ptr, toks, tok_ok, stride_xm, gc * GROUP + first, K,
                                          UNIT, IN_PREC, SWAP_AB, X_FP16)
                if not X_FP16:   # the values were x 2^-UNIT
                    s = s * UNIT
                if SWAP_AB:
                    acc += part * s[:, None]
                else:
                    acc += part * s[None, :]
            if SWAP_AB:
                tl.atomic_add(out_ptr + toks[None, :] * N + rows[:, None], acc,
                              mask=tok_ok[None, :] & row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(out_ptr + toks[:, None] * N + rows[None, :], acc,
                              mask=tok_ok[:, None] & row_ok[None, :], sem="relaxed")
        else:
            # ---- one token per program: int32 words, one lane per code position, FP32 multiply-add, the
            # group's scale applied to the group's partial sums. Codes decode straight to FP32 bit patterns
            # (value x 2^-UNIT32: code 1 of 4 bits is an FP32 subnormal, which FFMA keeps: no flush to zero), so
            # x is scaled by 2^X_LOG2 to keep the products normal
            xrow = x_ptr + pid_m * stride_xm
            acc = tl.zeros((BLOCK_N, NW), dtype=tl.float32)
            for gi in tl.static_range(GROUPS_PER_PROG):
                gc, s, t = _group_meta(scales_ptr, types_ptr, rows_c, pid_k * GROUPS_PER_PROG + gi, n_groups,
                                       type_stride)
                special = (tl.where(t >= 2, EA32, ER32) | ((t & 1) << 31))[:, None]   # FP32 pattern
                wrow = codes32_ptr + rows_c[:, None] * row_words + gc * WPG
                w = tl.load(wrow + q[None, :])
                part = tl.zeros((BLOCK_N, NW), dtype=tl.float32)
                if BITS == 4:
                    for hi in tl.static_range(2):
                        for odd in tl.static_range(2):
                            # the nibbles of bytes odd and odd + 2 moved to bits 0 and 16, magnitudes kept and
                            # signs copied 6 bits up (bits 9 and 25; other bits are don't-cares): one shift and
                            # one mask per nibble then give its FP32 pattern (magnitude bits 22-24, sign 31)
                            v = w >> (4 * hi + 8 * odd)
                            spread = (v & 0x00070007) | ((v << 6) & ~0x00070007)
                            for half in tl.static_range(2):   # byte odd + 2 half of each word
                                col = gc * GROUP + hi * (GROUP // 2) + 4 * q + (odd + 2 * half)
                                h = _shift(spread, 22 - 16 * half) & -0x7E400000          # 0x81C00000
                                part += (_value32(h, special)
                                         * (_load_x(xrow + col, col, K, EVEN_K) * X_SCALE)[None, :])
                else:
                    for k in tl.static_range(4):
                        first = 4 * q + k * Q
                        sw = _sign_words(codes32_ptr, wrow, rows_c, row_words, gc, first, k, WPG, NW, Q)
                        for b in tl.static_range(4):
                            col = gc * GROUP + first + b
                            # the 2-bit field at bit 8b + 2k to the FP32 exponent (bits 23-24), the sign to 31
                            h = ((_shift(w, 23 - (8 * b + 2 * k)) & 0x01800000)
                                 | ((sw >> ((first % 32) + b)[None, :]) << 31))
                            part += (_value32(h, special)
                                     * (_load_x(xrow + col, col, K, EVEN_K) * X_SCALE)[None, :])
                acc += part * (s * UNIT32)[:, None]
            tl.atomic_add(out_ptr + pid_m * N + rows, tl.sum(acc, axis=1), mask=row_ok, sem="relaxed")

    def _configs():
        # batch-1 path: each thread holds BLOCK_N / (8 x num_warps) rows (8 rows per warp at 4 words a thread),
        # and every activation it loads serves that many rows: 8 rows (the first four) keep the activation
        # loads and conversions to ~1/4 instruction per weight; SASS counts per weight are in the benchmark
        cfgs = []
        for bn, gpp, nw in ((128, 2, 2), (256, 2, 4), (128, 1, 2), (128, 2, 4), (128, 4, 4), (256, 4, 8)):
            cfgs.append(triton.Config({"BLOCK_M": 1, "BLOCK_N": bn, "GROUPS_PER_PROG": gpp, "USE_DOT": False,
                                       "SWAP_AB": False}, num_warps=nw))
        # tl.dot path: swapped (weight rows as the MMA's M, the decoded weight its register operand) or not
        for bm, bn, gpp, nw, swap in ((16, 64, 2, 4, True), (16, 128, 2, 4, True), (16, 128, 4, 8, True),
                                      (16, 64, 2, 4, False), (32, 128, 2, 4, True), (64, 128, 2, 8, True),
                                      (64, 128, 1, 4, True), (64, 64, 2, 4, False)):
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUPS_PER_PROG": gpp, "USE_DOT": True,
                                       "SWAP_AB": swap}, num_warps=nw))
        return cfgs

    def _prune(configs, named_args, **kwargs):
        """One token: the batch-1 configs (the tl.dot path pads the tokens to 16). 2-4 tokens: the tl.dot configs
        with 16-token blocks and the first two batch-1 configs (a program per token, the weight re-read from
        L2 or HBM per token); more tokens: tl.dot configs whose token block does not exceed the bucket."""
        mb = named_args["m_bucket"]
        if mb == 1:
            return [c for c in configs if not c.kwargs["USE_DOT"]]
        dot = [c for c in configs if c.kwargs["USE_DOT"] and c.kwargs["BLOCK_M"] <= max(16, mb)]
        return dot + ([c for c in configs if not c.kwargs["USE_DOT"]][:2] if mb <= 4 else [])

    _bitmod_kernel_tuned = triton.autotune(
        configs=_configs(), key=["m_bucket", "N", "K", "BITS", "GROUP"], reset_to_zero=["out_ptr"],
        prune_configs_by={"early_config_prune": _prune})(_bitmod_kernel)


_TL_DTYPE = {}
if tl is not None:
    _TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

CONFIG_KEYS = ("block_m", "block_n", "groups_per_prog", "use_dot", "swap_ab", "num_warps")


def token_bucket(m: int) -> int:
    return 1 if m == 1 else min(128, triton.next_power_of_2(m))


def default_config(m: int) -> dict:
    """The config used without autotuning (the interpreter, or ``config={}``): batch-1 path for one token."""
    if m == 1:
        return {"block_m": 1, "block_n": 128, "groups_per_prog": 2, "use_dot": False, "swap_ab": False,
                "num_warps": 2}
    return {"block_m": 16 if m <= 16 else 32, "block_n": 64, "groups_per_prog": 2, "use_dot": True, "swap_ab": True,
            "num_warps": 4}


def _as_dict(cfg) -> dict:
    kw = cfg.kwargs
    return {"block_m": kw["BLOCK_M"], "block_n": kw["BLOCK_N"], "groups_per_prog": kw["GROUPS_PER_PROG"],
            "use_dot": kw["USE_DOT"], "swap_ab": kw["SWAP_AB"], "num_warps": cfg.num_warps}


def last_config() -> dict | None:
    """The config of the most recent autotuned call (None before any)."""
    cfg = getattr(_bitmod_kernel_tuned, "best_config", None) if triton is not None else None
    return None if cfg is None else _as_dict(cfg)


def tuned_config(m: int, n: int, k: int, bits: int, group_size: int, x_dtype: torch.dtype) -> dict | None:
    """The config the autotuner picked for this call signature (None before the first call)."""
    if triton is None:
        return None
    for key, cfg in _bitmod_kernel_tuned.cache.items():
        if tuple(key[:5]) == (token_bucket(m), n, k, bits, group_size) and str(x_dtype) in key:
            return _as_dict(cfg)
    return None


def _prepare(x: torch.Tensor, p: PackedBitMoD, config: dict | None):
    """Checks; returns (x2, out, kernel args, constexpr meta, grid function)."""
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
    if config is not None and set(config) - set(CONFIG_KEYS):
        raise ValueError(f"unknown config keys {sorted(set(config) - set(CONFIG_KEYS))}; known: {CONFIG_KEYS}")
    x2 = x.reshape(-1, p.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], p.out_features
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    codes8 = p.codes.contiguous()
    if codes8.data_ptr() % 16:
        codes8 = codes8.clone()
    codes32 = codes8.view(torch.int32)
    er_pat, ea_pat = special_patterns(p.bits)
    args = (x2, codes32, codes8, p.scales.contiguous(), p.type_ids.contiguous(), out, m, n, p.in_features,
            p.n_groups, x2.stride(0), codes32.shape[1], p.type_ids.shape[1], token_bucket(max(m, 1)))
    er32, ea32 = special_patterns32(p.bits)
    meta = dict(BITS=p.bits, GROUP=gs, UNIT=float(2 ** UNIT_LOG2[p.bits]), ER_PAT=er_pat, EA_PAT=ea_pat,
                UNIT32=float(2.0 ** (UNIT32_LOG2[p.bits] - X_LOG2)), X_SCALE=float(2.0 ** X_LOG2), ER32=er32, EA32=ea32,
                EVEN_K=p.in_features % gs == 0, IN_PREC="ieee" if x.dtype == torch.float32 else "tf32",
                X_FP16=x.dtype == torch.float16)

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(p.n_groups, meta_["GROUPS_PER_PROG"]),
                triton.cdiv(m, meta_["BLOCK_M"]))
    return x2, out, args, meta, grid


def _launch(args, meta, grid, config: dict, m: int):
    """Launch with a pinned config; returns Triton's compiled kernel object."""
    cfg = {**default_config(m), **config}
    if cfg["use_dot"] and (cfg["block_m"] < 16 or cfg["block_n"] < 16):
        raise ValueError(f"the tl.dot path needs block_m and block_n >= 16, got {cfg}")
    if not cfg["use_dot"] and (cfg["block_m"] != 1 or cfg["swap_ab"]):
        raise ValueError(f"the batch-1 path takes one token per program (block_m=1, swap_ab=False), got {cfg}")
    return _bitmod_kernel[grid](*args, **meta, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                                GROUPS_PER_PROG=cfg["groups_per_prog"], USE_DOT=cfg["use_dot"],
                                SWAP_AB=cfg["swap_ab"], num_warps=cfg["num_warps"])


def bitmod_linear_triton(x: torch.Tensor, p: PackedBitMoD, bias: torch.Tensor | None = None,
                         config: dict | None = None) -> torch.Tensor:
    """``x @ dequantize(p).T + bias`` with the Triton kernel; returned in ``x.dtype``.

    ``config``: None autotunes (on a GPU; the interpreter uses ``default_config``); a dict with any of
    ``CONFIG_KEYS`` pins the launch (missing keys from ``default_config``)."""
    x2, out, args, meta, grid = _prepare(x, p, config)
    m, n = out.shape
    if m == 0:
        return out.to(x.dtype).view(*x.shape[:-1], n)
    if config is None and not _interpreting():
        before = len(_bitmod_kernel_tuned.cache)
        _bitmod_kernel_tuned[grid](*args, **meta)
        if len(_bitmod_kernel_tuned.cache) != before:  # tuned in this call: the timing runs added into out
            out.zero_()
            _bitmod_kernel_tuned[grid](*args, **meta)
    else:
        _launch(args, meta, grid, config or {}, m)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], n)


def _sass(kernel) -> str | None:
    """SASS of a compiled kernel: Triton's own disassembly, else nvdisasm (shipped in Triton's wheel) on the cubin."""
    try:
        return kernel.asm["sass"]
    except Exception:  # noqa: BLE001 - older Triton or no cuobjdump
        pass
    try:
        import subprocess
        import tempfile
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, timeout=120)
        return out.stdout if out.returncode == 0 and out.stdout else None
    except Exception:  # noqa: BLE001
        return None


def count_sass(text: str) -> int:
    """Instructions in a SASS listing, NOP padding left out: cuobjdump / nvdisasm lines ("/*0a40*/  LOP3 ...")
    or Triton's own listing with control codes ("--:-:-:-:1<TAB>LOP3 ...")."""
    n = 0
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*)", line) or re.match(r"[-0-9A-Fa-f]{2}:\S*\t(.*)", line)
        if m and "NOP" not in m.group(1).split(";")[0].split():
            n += 1
    return n


def instruction_count(x: torch.Tensor, p: PackedBitMoD, config: dict) -> dict:
    """Static instruction count of the kernel compiled for ``config`` (SASS where Triton can disassemble its
    cubin, else PTX) and the launch's size. The kernel has no loops, so each thread issues each instruction
    once: count x 32 x num_warps x programs = thread-instructions of one call."""
    x2, out, args, meta, grid = _prepare(x, p, config)
    cfg = {**default_config(out.shape[0]), **config}
    kernel = _launch(args, meta, grid, cfg, out.shape[0])
    text, kind = _sass(kernel), "sass"
    if text is None:  # no disassembler: PTX instructions (lines ending in ';', no directives)
        text, kind = kernel.asm["ptx"], "ptx"
        count = sum(1 for line in (ln.strip() for ln in text.splitlines())
                    if line.endswith(";") and not line.startswith((".", "//", "{", "}")))
    else:
        count = count_sass(text)
    g = grid({"BLOCK_N": cfg["block_n"], "GROUPS_PER_PROG": cfg["groups_per_prog"], "BLOCK_M": cfg["block_m"]})
    programs = g[0] * g[1] * g[2]
    return {"kind": kind, "per_thread": count, "num_warps": cfg["num_warps"], "programs": programs,
            "thread_instructions": count * 32 * cfg["num_warps"] * programs,
            "registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None)}
