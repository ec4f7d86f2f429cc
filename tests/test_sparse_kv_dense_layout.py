"""The dense layout of the KV kernels (every value in tile order, no bitmaps: the dense baseline run by the same
code) and the nothing-pruned caches: exact round trips, the op against a float64 reference, the same decode as
transformers' SDPA on the unpruned cache, bad input refused. The AVX-512 strip kernel is also run through SIMDe
on CPUs without AVX-512 (both layouts), against a float64 reference computed here."""

import ctypes
from pathlib import Path

import pytest
import torch

from effllm_lib.sparse.kv_cache import (PackedKV, SparseKVCache, SparseKVConfig, SparseKVLayer, available_kv_kernels,
                                        pack_kv, prune_kv, sparse_kv_attention)

from simde_build import build_emulated  # noqa: E402
from test_sparse_kv import reference_attention  # noqa: E402  (the float64 reference, shared)

KERNELS = list(available_kv_kernels())
KERNEL_DIR = Path(__file__).resolve().parents[1] / "effllm_lib" / "sparse" / "kernels"


@pytest.mark.parametrize("h,s,d", [(3, 100, 64), (1, 37, 256), (8, 1, 16), (2, 33, 48)])
def test_dense_layout_round_trip_and_bytes(h, s, d):
    torch.manual_seed(s)
    k, v = torch.randn(h, s, d).bfloat16(), torch.randn(h, s, d).bfloat16()
    k[0, 0, :3] = 0  # explicit zeros are stored like any value
    p = pack_kv(k, v, layout="dense")
    assert p.layout == "dense" and p.k_bitmaps.numel() == p.v_bitmaps.numel() == 0
    assert torch.equal(p.keys(), k) and torch.equal(p.values(), v)
    sp, spv, dp = -(-s // 16) * 16, -(-s // 32) * 32, -(-d // 32) * 32
    assert p.nbytes() == 2 * (h * sp * dp + h * d * spv)  # tiles incl. padding, no bitmaps or offsets
    assert p.sparsity == (0.0, 0.0)
    if s % 32 == 0 and d % 32 == 0:
        assert p.nbytes() == 2 * 2 * h * s * d  # exactly the dense cache


def test_zero_sparsity_keeps_every_entry():
    """sparsity 0: prune_kv zeroes nothing and both layouts give back the cache bit for bit."""
    torch.manual_seed(1)
    k = torch.randn(2, 70, 32).bfloat16()
    assert torch.equal(prune_kv(k, 0.0), k)
    for layout in ("bitmap", "dense"):
        p = pack_kv(prune_kv(k, 0.0), prune_kv(k, 0.0), layout=layout)
        assert torch.equal(p.keys(), k) and torch.equal(p.values(), k)
    assert pack_kv(k, k).sparsity == (0.0, 0.0)  # randn has no exact zeros here: every entry stored


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("hq,hkv,s,d,t", [(9, 3, 100, 64, 0), (4, 1, 37, 256, 5), (8, 8, 1, 16, 3),
                                           (32, 8, 520, 128, 1)])
def test_dense_layout_matches_float64_reference(kernel, hq, hkv, s, d, t):
    torch.manual_seed(hq * 100 + s)
    k, v = torch.randn(hkv, s, d), torch.randn(hkv, s, d)
    q, k_tail, v_tail = torch.randn(hq, d), torch.randn(hkv, t, d), torch.randn(hkv, t, d)
    scale = 0.7 / d ** 0.5
    out = sparse_kv_attention(q, pack_kv(k, v, layout="dense"), k_tail, v_tail, scale, kernel)
    ref = reference_attention(q, k.bfloat16(), v.bfloat16(), k_tail, v_tail, scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    # the bitmap layout at sparsity 0 computes the same products in the same order: identical floats
    assert torch.equal(out, sparse_kv_attention(q, pack_kv(k, v), k_tail, v_tail, scale, kernel))


def test_dense_layout_bad_input():
    k = torch.randn(2, 40, 32)
    with pytest.raises(ValueError, match="layout"):
        pack_kv(k, k, layout="tiles")
    with pytest.raises(ValueError, match="layout"):
        SparseKVConfig(0.0, layout="csr")
    with pytest.raises(ValueError, match="sparsity must be 0"):
        SparseKVConfig(0.5, layout="dense")
    with pytest.raises(ValueError, match="sparsity must be 0"):
        SparseKVConfig(0.0, value_sparsity=0.3, layout="dense")
    p, ps = pack_kv(k, k, layout="dense"), pack_kv(k, k)
    q = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="dense layout"):  # truncated values
        sparse_kv_attention(q, PackedKV(p.k_bitmaps, p.k_values[:-1], p.k_offsets, p.v_bitmaps, p.v_values,
                                        p.v_offsets, 2, 40, 32, "dense"))
    with pytest.raises(RuntimeError, match="both be packed or both dense"):  # K dense, V^T packed
        sparse_kv_attention(q, PackedKV(p.k_bitmaps, p.k_values, p.k_offsets, ps.v_bitmaps, ps.v_values,
                                        ps.v_offsets, 2, 40, 32, "dense"))


@pytest.mark.parametrize("sparsity,layout", [(0.0, "bitmap"), (0.0, "dense")])
def test_nothing_pruned_cache_decodes_like_sdpa(sparsity, layout):
    """A SparseKVCache that prunes nothing (either layout) gives transformers' SDPA decode on the same bf16 cache."""
    from transformers import DynamicCache

    from effllm_lib.models import tiny_causal_lm
    from effllm_lib.sparse.kv_cache import enable_sparse_kv_

    model, _ = tiny_causal_lm("llama", tokenizer="byte", layers=2, hidden=64)
    model = enable_sparse_kv_(model)
    torch.manual_seed(7)
    prompt, cont = torch.randint(0, 250, (1, 45)), torch.randint(0, 250, (1, 4))
    with torch.no_grad():
        cache = SparseKVCache(model.config, SparseKVConfig(sparsity, layout=layout))
        ref = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        model(input_ids=prompt, past_key_values=ref, use_cache=True)
        for i, layer in enumerate(ref.layers):
            assert isinstance(cache.layers[i], SparseKVLayer) and cache.layers[i].packed.layout == layout
            assert torch.equal(cache.layers[i].packed.keys(), layer.keys[0].bfloat16())  # every entry kept
            assert torch.equal(cache.layers[i].packed.values(), layer.values[0].bfloat16())
            layer.keys, layer.values = layer.keys.bfloat16().float(), layer.values.bfloat16().float()
        for t in range(cont.shape[1]):
            a = model(input_ids=cont[:, t:t + 1], past_key_values=cache, use_cache=True).logits
            b = model(input_ids=cont[:, t:t + 1], past_key_values=ref, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the AVX-512 strip kernel through SIMDe
class F32Problem(ctypes.Structure):  # sparse_kernels.h, field for field
    _fields_ = [("x", ctypes.c_void_p), ("m", ctypes.c_int64), ("ldx", ctypes.c_int64), ("bitmaps", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("strip_offsets", ctypes.c_void_p), ("k_tiles", ctypes.c_int64),
                ("strip_base", ctypes.c_int64), ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64)]


# SIMDe lacks the 16-bit expand-load: Intel's definition as a loop (the next stored value into each set lane)
SHIMS = r"""
#define SIMDE_ENABLE_NATIVE_ALIASES
#include "simde/x86/avx512.h"
static inline simde__m512i shim_maskz_expandloadu_epi16(uint32_t mask, const void* p) {
  const uint16_t* src = static_cast<const uint16_t*>(p);
  uint16_t r[32];
  for (int i = 0; i < 32; ++i) r[i] = ((mask >> i) & 1u) ? *src++ : 0;
  return simde_mm512_loadu_si512(r);
}
#define _mm512_maskz_expandloadu_epi16 shim_maskz_expandloadu_epi16
"""


@pytest.fixture(scope="module")
def emulated_avx512(tmp_path_factory):
    lib = build_emulated(KERNEL_DIR / "kv_avx512.cpp", SHIMS, KERNEL_DIR, tmp_path_factory.mktemp("kv_avx512_simde"),
                         must_contain="spmv_f32_avx512")
    return ctypes.CDLL(str(lib)).spmv_f32_avx512


@pytest.mark.parametrize("layout", ["bitmap", "dense"])
@pytest.mark.parametrize("m", [1, 3, 4, 8, 13])
def test_emulated_avx512_strips(emulated_avx512, layout, m):
    """x [m, K] @ W^T for W = V^T of a pack_kv cache (either layout), strips split over two calls."""
    torch.manual_seed(m)
    h, s, d = 2, 70, 32
    v = prune_kv(torch.randn(h, s, d), 0.0 if layout == "dense" else 0.6)
    p = pack_kv(v, v, layout=layout)
    w = v.bfloat16().transpose(1, 2).reshape(h * d, s)  # V^T, the matrix of the PV product
    k_tiles = -(-s // 32)
    x = torch.zeros(m, k_tiles * 32)
    x[:, :s] = torch.randn(m, s)
    strips = h * d // 16
    out = torch.full((m, strips * 16), float("nan"))
    dense = layout == "dense"
    prob = F32Problem(x.data_ptr(), m, x.stride(0), None if dense else p.v_bitmaps.data_ptr(), p.v_values.data_ptr(),
                      None if dense else p.v_offsets.data_ptr(), k_tiles, 0, out.data_ptr(), out.stride(0))
    emulated_avx512(ctypes.byref(prob), ctypes.c_int64(0), ctypes.c_int64(strips // 2 + 1))
    emulated_avx512(ctypes.byref(prob), ctypes.c_int64(strips // 2 + 1), ctypes.c_int64(strips))
    ref = x[:, :s].double() @ w.double().T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
