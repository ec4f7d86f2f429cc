// Sparse KV-cache attention, the float32 strip products (F32Problem in sparse_kernels.h) with AVX-512: one
// masked expand-load (vpexpandw, VBMI2) decompresses a tile row of 32 bf16 = 16 outputs x 2 inputs; dword i
// of it holds output i's weights for inputs k0 (low half) and k0 + 1 (high half), widened to float32 exactly
// by a shift and a mask, then two FMAs per row of x. Needs AVX512F/BW/VL/VBMI2 (no AVX512_BF16: the products
// are float32); the caller dispatches here only when the probe found them.
#include "sparse_kernels.h"

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")

namespace {
constexpr int kRowsPerTile = 16;

// B rows of x from m0; with few rows two chains per input parity hide the FMA latency. Dense: no bitmaps, every
// tile row is 32 stored values (a plain load instead of the expand-load; the same loop otherwise).
template <int B, bool Dense>
void strip_rows_avx512(const F32Problem& p, int64_t s, int64_t m0) {
  constexpr int kChains = B <= 2 ? 2 : 1;
  __m512 acc_even[B][kChains], acc_odd[B][kChains];
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < kChains; ++c) acc_even[b][c] = acc_odd[b][c] = _mm512_setzero_ps();
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const uint16_t* v = Dense ? p.values + s * p.k_tiles * kRowsPerTile * 32 : p.values + p.strip_offsets[s];
  const uint32_t* bm = Dense ? nullptr : reinterpret_cast<const uint32_t*>(p.bitmaps) + s * p.k_tiles * kRowsPerTile;
  const float* x0 = p.x + m0 * p.ldx;
  for (int64_t t = 0; t < p.k_tiles; ++t) {
#pragma GCC unroll 16
    for (int r = 0; r < kRowsPerTile; ++r) {
      __m512i w;
      if constexpr (Dense) {
        w = _mm512_loadu_si512(v);
        v += 32;
      } else {
        const uint32_t mask = bm[t * kRowsPerTile + r];
        w = _mm512_maskz_expandloadu_epi16(mask, v);
        v += __builtin_popcount(mask);
      }
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, high_half));
      const int64_t k0 = t * 32 + 2 * r;
      for (int b = 0; b < B; ++b) {
        const int c = r % kChains;
        acc_even[b][c] = _mm512_fmadd_ps(we, _mm512_set1_ps(x0[b * p.ldx + k0]), acc_even[b][c]);
        acc_odd[b][c] = _mm512_fmadd_ps(wo, _mm512_set1_ps(x0[b * p.ldx + k0 + 1]), acc_odd[b][c]);
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    __m512 y = _mm512_add_ps(acc_even[b][0], acc_odd[b][0]);
    for (int c = 1; c < kChains; ++c) y = _mm512_add_ps(y, _mm512_add_ps(acc_even[b][c], acc_odd[b][c]));
    _mm512_storeu_ps(p.out + (m0 + b) * p.ldo + (s - p.strip_base) * 16, y);
  }
}

template <bool Dense>
void strips_avx512(const F32Problem& p, int64_t strip_begin, int64_t strip_end) {
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    int64_t m0 = 0;
    for (; m0 + 8 <= p.m; m0 += 8) strip_rows_avx512<8, Dense>(p, s, m0);
    const int64_t rest = p.m - m0;
    if (rest >= 4) { strip_rows_avx512<4, Dense>(p, s, m0); m0 += 4; }
    if (p.m - m0 >= 2) { strip_rows_avx512<2, Dense>(p, s, m0); m0 += 2; }
    if (p.m - m0 >= 1) strip_rows_avx512<1, Dense>(p, s, m0);
  }
}
}  // namespace

// bitmaps == nullptr: the dense layout (every value of every tile, in tile order; strip_offsets unused).
extern "C" void spmv_f32_avx512(const F32Problem& p, int64_t strip_begin, int64_t strip_end) {
  if (p.bitmaps == nullptr)
    strips_avx512<true>(p, strip_begin, strip_end);
  else
    strips_avx512<false>(p, strip_begin, strip_end);
}

#pragma GCC pop_options
