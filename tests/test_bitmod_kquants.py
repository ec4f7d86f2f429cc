"""llama.cpp's Q4_K / Q3_K (effllm_lib.bitmod.kquants): the packed bytes dequantized by the gguf package equal our
fake-quantized weights exactly; the per-sub-block fits match plain scalar versions of make_qkx2 / make_q3."""

import math

import numpy as np
import pytest
import torch

from effllm_lib.bitmod import kquants as K
from effllm_lib.bitmod.quantize import BitMoDConfig, quantize_, quantize_tensor

gguf = pytest.importorskip("gguf")


def _weights(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[0, :32] += 3.0  # a sub-block that is all positive (Q4_K's min clamps to 0)
    w[1, 32:64] = 0.0  # an all-zero sub-block
    w[2] = 0.0  # an all-zero row
    w[3, 100] = 40.0  # an outlier
    w[4, :16] = -0.7  # a constant negative sub-block
    return w


@pytest.mark.parametrize("kind", ["q4_k", "q3_k"])
@pytest.mark.parametrize("cols", [256, 576, 768])
def test_gguf_dequantizes_our_bytes_to_our_weights(kind, cols):
    w = _weights(16, cols, seed=cols)
    fake = quantize_tensor(w, 4 if kind == "q4_k" else 3, kind).weight
    packed = (K.pack_q4_k if kind == "q4_k" else K.pack_q3_k)(w)
    assert packed.shape == (16 * math.ceil(cols / 256), K.BLOCK_BYTES[kind]) and packed.dtype == np.uint8
    qtype = gguf.GGMLQuantizationType.Q4_K if kind == "q4_k" else gguf.GGMLQuantizationType.Q3_K
    deq = gguf.quants.dequantize(packed.reshape(-1), qtype).reshape(16, -1)[:, :cols]
    assert np.array_equal(deq, fake.numpy())
    rel = float((fake - w).pow(2).mean() / w.pow(2).mean())
    assert rel < (0.01 if kind == "q4_k" else 0.04)  # a working 4.5 / 3.4 bit quantizer, not a broken one
    assert (fake[2] == 0).all()


def ref_qkx2(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    """make_qkx2_quants as ggml-quants.c states it, one sub-block, Python floats."""
    n = len(x)
    av = math.sqrt(sum(v * v for v in x) / n)
    w = [av + abs(v) for v in x]
    lo, hi = min(min(x), 0.0), max(x)
    if hi == lo:
        return 0.0, -lo
    sum_w, sum_x = sum(w), sum(wi * xi for wi, xi in zip(w, x))
    iscale = nmax / (hi - lo)
    scale = 1 / iscale
    L = [min(max(round(iscale * (v - lo)), 0), nmax) for v in x]
    best = sum(wi * (scale * l + lo - v) ** 2 for wi, l, v in zip(w, L, x))
    mn = lo
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - lo)
        la = [min(max(round(iscale * (v - lo)), 0), nmax) for v in x]
        sl = sum(wi * l for wi, l in zip(w, la))
        sl2 = sum(wi * l * l for wi, l in zip(w, la))
        sxl = sum(wi * l * v for wi, l, v in zip(w, la, x))
        D = sum_w * sl2 - sl * sl
        if D > 0:
            ts, tm = (sum_w * sxl - sum_x * sl) / D, (sl2 * sum_x - sl * sxl) / D
            if tm > 0:
                ts, tm = sxl / sl2, 0.0
            mad = sum(wi * (ts * l + tm - v) ** 2 for wi, l, v in zip(w, la, x))
            if mad < best:
                best, scale, mn = mad, ts, tm
    return scale, -mn


def ref_q3(x, nmax=4):
    """make_q3_quants(do_rmse=true) as ggml-quants.c states it, one sub-block, Python floats."""
    mx = max(x, key=abs)
    if mx == 0:
        return 0.0
    iscale = -nmax / mx
    L = [min(max(round(iscale * v), -nmax), nmax - 1) for v in x]
    w = [v * v for v in x]
    sumlx = sum(wi * v * l for wi, v, l in zip(w, x, L))
    suml2 = sum(wi * l * l for wi, l in zip(w, L))
    for _ in range(5):
        changed = 0
        for i, v in enumerate(x):
            slx = sumlx - w[i] * v * L[i]
            if slx > 0:
                sl2 = suml2 - w[i] * L[i] * L[i]
                new = min(max(round(v * sl2 / slx), -nmax), nmax - 1)
                if new != L[i]:
                    slx += w[i] * v * new
                    sl2 += w[i] * new * new
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new, slx, sl2
                        changed += 1
        if not changed:
            break
    return sumlx / suml2


def test_sub_block_fits_match_the_scalar_algorithms():
    w = _weights(6, 256, seed=5).double()
    subs32 = w.reshape(-1, 32)
    scale, mn = K._qkx2(subs32)
    for i in range(len(subs32)):
        rs, rm = ref_qkx2(subs32[i].tolist())
        assert scale[i].item() == pytest.approx(rs, rel=1e-9, abs=1e-12)
        assert mn[i].item() == pytest.approx(rm, rel=1e-9, abs=1e-12)
    subs16 = w.reshape(-1, 16)
    s3, _ = K._q3(subs16.clone())
    for i in range(len(subs16)):
        assert s3[i].item() == pytest.approx(ref_q3(subs16[i].tolist()), rel=1e-9, abs=1e-12)


def test_bits_per_weight_and_model():
    assert K.kquant_bits("q4_k", 256) == 144 * 8 and K.kquant_bits("q3_k", 256) == 110 * 8
    # 576 = 2 full super-blocks + one of 64 (2 sub-blocks of 32 / 4 of 16, one FP16 d (and dmin))
    assert K.kquant_bits("q4_k", 576) == 2 * 1152 + 4 * 64 + 2 * 12 + 32
    assert K.kquant_bits("q3_k", 576) == 2 * 880 + 3 * 64 + 4 * 6 + 16
    from test_bitmod_quantize import tiny_llama

    model = tiny_llama(tie=False, hidden=96)  # 96: one short super-block per row
    report = quantize_(model, BitMoDConfig(bits=4, dtype="q4_k"))
    rows_cols = [(r.rows, r.cols) for r in report.layers.itertuples()]
    total = sum(r * c for r, c in rows_cols)
    assert report.bits_per_weight == pytest.approx(sum(r * K.kquant_bits("q4_k", c) for r, c in rows_cols) / total)
    assert report.nominal_bits_per_weight == 4.5
    assert BitMoDConfig(bits=3, dtype="q3_k").label == "q3_k3"
    with pytest.raises(ValueError, match="3-bit type"):
        BitMoDConfig(bits=4, dtype="q3_k")
    with pytest.raises(ValueError, match="sub-block"):
        quantize_tensor(torch.randn(4, 40), 4, "q4_k")
    from effllm_lib.bitmod.gptq import gptq_quantize

    with pytest.raises(ValueError, match="not implemented for q4_k"):
        gptq_quantize(torch.randn(4, 256), torch.eye(256), 4, "q4_k")
