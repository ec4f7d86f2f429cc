// AVX-512F kernel: the group's 16-entry value set, already multiplied by the scale and rounded to the weight
// dtype, lives in one zmm register; vpermps (_mm512_permutexvar_ps) looks 16 codes up at once (it reads only
// the low 4 bits of each index, so the low nibble needs no mask). A byte-table lookup (VBMI vpermb) would
// give int8 values that still need a convert and a scale multiply per weight; the FP32 table does both once
// per group. Needs group sizes padded to a multiple of 64 (bindings.cpp checks).
#include <immintrin.h>

#include <cstring>

#include "bitmod_kernels.h"

// headers above keep the generic target; only the code below is compiled for avx512f,avx2,fma,f16c
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")

namespace {
inline __m512 round_lut(__m512 v, int mode) {
  if (mode == 1) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (mode == 2) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// the group's FP16 scale through F16C (exact, subnormals included) rather than the scalar bit fiddling
inline float scale_of(const GemvProblem& p, int64_t row, int64_t g) {
  const int64_t i = row * p.n_groups + g;
  if (p.scale_fp32) return static_cast<const float*>(p.scales)[i];
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<const uint16_t*>(p.scales)[i])));
}

// R rows at once: every activation load serves R rows, and R x MB x S accumulators give independent FMA
// chains (S = 2: the low and high nibbles, resp. even and odd 2-bit fields, sum into different registers), so
// one FMA's 4-cycle latency no longer paces the loop: with a single chain, 2 dependent FMAs per 32 weights held
// a core to ~4 weights per cycle.
template <int MB, int R, int S>
void row_block(const GemvProblem& p, int64_t r0) {
  const int64_t gbytes = bitmod_group_bytes(p), gp = p.gp, half = gp / 2, q = gp / 4;
  __m512 acc[R][MB][S];
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < MB; ++b)
      for (int s = 0; s < S; ++s) acc[i][b][s] = _mm512_setzero_ps();
  const uint8_t* row_codes[R];
  for (int i = 0; i < R; ++i) row_codes[i] = p.codes + (r0 + i) * p.n_groups * gbytes;
  for (int64_t g = 0; g < p.n_groups; ++g) {
    __m512 lut[R];
    const uint8_t* c[R];
    for (int i = 0; i < R; ++i) {
      lut[i] = round_lut(_mm512_mul_ps(_mm512_loadu_ps(p.table + 16 * bitmod_type(p, r0 + i, g)),
                                       _mm512_set1_ps(scale_of(p, r0 + i, g))),
                         p.round_mode);
      c[i] = row_codes[i] + g * gbytes;
    }
    const float* xg = p.x + g * gp;
    if (p.bits == 4) {
      for (int64_t j = 0; j < half; j += 16) {
        __m512 lo[R], hi[R];
        for (int i = 0; i < R; ++i) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c[i] + j)));
          lo[i] = _mm512_permutexvar_ps(b, lut[i]);  // vpermps reads the low 4 bits of each index only
          hi[i] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut[i]);
        }
        for (int mb = 0; mb < MB; ++mb) {
          const __m512 xl = _mm512_loadu_ps(xg + mb * p.ldx + j), xh = _mm512_loadu_ps(xg + mb * p.ldx + half + j);
          for (int i = 0; i < R; ++i) {
            acc[i][mb][0] = _mm512_fmadd_ps(lo[i], xl, acc[i][mb][0]);
            acc[i][mb][S - 1] = _mm512_fmadd_ps(hi[i], xh, acc[i][mb][S - 1]);
          }
        }
      }
    } else {
      for (int64_t j = 0; j < q; j += 16) {
        __m512i b[R];
        for (int i = 0; i < R; ++i)
          b[i] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c[i] + j)));
        for (int k = 0; k < 4; ++k) {
          __m512 w[R];
          for (int i = 0; i < R; ++i) {
            uint16_t high;
            __builtin_memcpy(&high, c[i] + q + (j + k * q) / 8, 2);
            __m512i idx = _mm512_and_si512(_mm512_srli_epi32(b[i], 2 * k), _mm512_set1_epi32(3));
            idx = _mm512_mask_or_epi32(idx, static_cast<__mmask16>(high), idx, _mm512_set1_epi32(4));
            w[i] = _mm512_permutexvar_ps(idx, lut[i]);
          }
          for (int mb = 0; mb < MB; ++mb) {
            const __m512 xv = _mm512_loadu_ps(xg + mb * p.ldx + k * q + j);
            for (int i = 0; i < R; ++i) acc[i][mb][k % S] = _mm512_fmadd_ps(w[i], xv, acc[i][mb][k % S]);
          }
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    const float bias = p.bias ? p.bias[r0 + i] : 0.0f;
    for (int mb = 0; mb < MB; ++mb) {
      __m512 sum = acc[i][mb][0];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[i][mb][s]);
      p.out[mb * p.ldo + r0 + i] = hsum(sum) + bias;
    }
  }
}

// two rows per block up to 4 tokens (2 x 4 x 2 = 16 accumulators of the 32 zmm registers), one row beyond
template <int MB>
void rows(const GemvProblem& p, int64_t row_begin, int64_t row_end) {
  constexpr int R = MB <= 4 ? 2 : 1;
  int64_t r = row_begin;
  for (; r + R <= row_end; r += R) row_block<MB, R, 2>(p, r);
  for (; r < row_end; ++r) row_block<MB, 1, 2>(p, r);
}
}  // namespace

extern "C" void bitmod_gemv_avx512(const GemvProblem& p, int64_t row_begin, int64_t row_end) {
  switch (p.m) {
    case 1: rows<1>(p, row_begin, row_end); break;
    case 2: rows<2>(p, row_begin, row_end); break;
    case 3: rows<3>(p, row_begin, row_end); break;
    case 4: rows<4>(p, row_begin, row_end); break;
    case 5: rows<5>(p, row_begin, row_end); break;
    case 6: rows<6>(p, row_begin, row_end); break;
    case 7: rows<7>(p, row_begin, row_end); break;
    default: rows<8>(p, row_begin, row_end); break;
  }
}
#pragma GCC pop_options
