// AVX-512 sparse kernel (the paper's "AVX" path): decompress one tile row of 32 bf16 weights with a masked
// expand-load (the bitmap is the mask), then multiply it with the matching input pair of each token using
// the AVX-512 bf16 dot product (vdpbf16ps: 16 lanes, each lane a pair). Needs AVX512F/BW/VL, AVX512_BF16,
// VBMI2 (vpexpandw). Only the functions below are compiled for that target; bindings.cpp calls them only
// when cpu_probe() found every one of those extensions.
#include "sparse_kernels.h"

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,popcnt")

namespace {
constexpr int kRowsPerTile = 16;

inline __m512i bcast_pair(const uint16_t* x) {
  int32_t pair;
  __builtin_memcpy(&pair, x, 4);
  return _mm512_set1_epi32(pair);
}

// One strip (16 outputs) for B tokens starting at m0. With few tokens, several accumulators per token
// break the dependency chain of vdpbf16ps so the loop runs at the rate of the expand-loads.
template <int B>
void strip_tokens(const Bf16Problem& p, int64_t s, int64_t m0) {
  constexpr int kChains = B >= 4 ? 1 : (B == 2 ? 2 : 4);
  __m512 acc[B][kChains];
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < kChains; ++c) acc[b][c] = _mm512_setzero_ps();
  const uint16_t* v = p.values + p.strip_offsets[s];
  const uint32_t* bm = reinterpret_cast<const uint32_t*>(p.bitmaps) + s * p.k_tiles * kRowsPerTile;
  const uint16_t* x0 = p.x + m0 * p.ldx;
  for (int64_t t = 0; t < p.k_tiles; ++t) {
#pragma GCC unroll 16
    for (int r = 0; r < kRowsPerTile; ++r) {
      const uint32_t mask = bm[t * kRowsPerTile + r];
      const __m512bh w = (__m512bh)_mm512_maskz_expandloadu_epi16(mask, v);
      v += _mm_popcnt_u32(mask);
      const int64_t k = t * 32 + 2 * r;
      for (int b = 0; b < B; ++b) {
        const __m512bh xb = (__m512bh)bcast_pair(x0 + b * p.ldx + k);
        acc[b][r % kChains] = _mm512_dpbf16_ps(acc[b][r % kChains], w, xb);
      }
    }
  }
  const int64_t n0 = s * 16;
  const __mmask16 valid = p.n - n0 >= 16 ? 0xffff : static_cast<__mmask16>((1u << (p.n - n0)) - 1);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(valid, p.bias + n0) : _mm512_setzero_ps();
  for (int b = 0; b < B; ++b) {
    __m512 y = acc[b][0];
    for (int c = 1; c < kChains; ++c) y = _mm512_add_ps(y, acc[b][c]);
    y = _mm512_add_ps(y, bias);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(y);
    _mm256_mask_storeu_epi16(p.out + (m0 + b) * p.ldo + n0, valid, h);
  }
}
}  // namespace

extern "C" void spmm_bf16_avx512(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end) {
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    int64_t m0 = 0;
    for (; m0 + 8 <= p.m; m0 += 8) strip_tokens<8>(p, s, m0);
    const int64_t rest = p.m - m0;
    if (rest >= 4) { strip_tokens<4>(p, s, m0); m0 += 4; }
    if (p.m - m0 >= 2) { strip_tokens<2>(p, s, m0); m0 += 2; }
    if (p.m - m0 >= 1) strip_tokens<1>(p, s, m0);
  }
}

// Four streams per thread: one sequential stream keeps too few lines in flight for the core's fill buffers
// on some parts, so the chunk is read as four interleaved quarters.
extern "C" uint64_t stream_read_avx512(const uint64_t* p, int64_t n) {
  const int64_t lines = n / 8, quarter = lines / 4;
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  const __m512i* q0 = reinterpret_cast<const __m512i*>(p);
  const __m512i* q1 = q0 + quarter;
  const __m512i* q2 = q1 + quarter;
  const __m512i* q3 = q2 + quarter;
  for (int64_t i = 0; i < quarter; ++i) {
    a0 = _mm512_or_si512(a0, _mm512_loadu_si512(q0 + i));
    a1 = _mm512_or_si512(a1, _mm512_loadu_si512(q1 + i));
    a2 = _mm512_or_si512(a2, _mm512_loadu_si512(q2 + i));
    a3 = _mm512_or_si512(a3, _mm512_loadu_si512(q3 + i));
  }
  uint64_t acc = _mm512_reduce_or_epi64(_mm512_or_si512(_mm512_or_si512(a0, a1), _mm512_or_si512(a2, a3)));
  for (int64_t i = 4 * quarter * 8; i < n; ++i) acc |= p[i];
  return acc;
}

// Dense rows from the tile format: row r of a tile holds, for each of 16 outputs, one pair of inputs
// (32 bits); a scatter of 16 dwords puts the expanded row into 16 rows of the dense matrix, zeros included,
// so the dense matrix needs no clearing first.
extern "C" void densify_bf16_avx512(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end,
                                    uint16_t* dense, int64_t ldd, int64_t k) {
  const __m512i row_step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(static_cast<int>(ldd / 2)));
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    const int64_t rows = p.n - s * 16 < 16 ? p.n - s * 16 : 16;
    const __mmask16 valid = rows >= 16 ? 0xffff : static_cast<__mmask16>((1u << rows) - 1);
    const uint16_t* v = p.values + p.strip_offsets[s];
    const uint32_t* bm = reinterpret_cast<const uint32_t*>(p.bitmaps) + s * p.k_tiles * kRowsPerTile;
    int32_t* base = reinterpret_cast<int32_t*>(dense + s * 16 * ldd);
    for (int64_t t = 0; t < p.k_tiles; ++t) {
      for (int r = 0; r < kRowsPerTile; ++r) {
        const uint32_t mask = bm[t * kRowsPerTile + r];
        const __m512i w = _mm512_maskz_expandloadu_epi16(mask, v);
        v += _mm_popcnt_u32(mask);
        const int64_t pair = t * 16 + r;  // column pair index: columns 2 pair, 2 pair + 1
        if (2 * pair >= k) continue;      // padding columns (k is even here: see bindings)
        _mm512_mask_i32scatter_epi32(base + pair, valid, row_step, w, 4);
      }
    }
  }
}

#pragma GCC pop_options
