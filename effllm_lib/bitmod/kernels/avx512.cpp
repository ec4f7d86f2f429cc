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

template <int MB>
void rows(const GemvProblem& p, int64_t row_begin, int64_t row_end) {
  const int64_t gbytes = bitmod_group_bytes(p), gp = p.gp, half = gp / 2, q = gp / 4;
  for (int64_t r = row_begin; r < row_end; ++r) {
    __m512 acc[MB];
    for (int b = 0; b < MB; ++b) acc[b] = _mm512_setzero_ps();
    const uint8_t* row_codes = p.codes + r * p.n_groups * gbytes;
    for (int64_t g = 0; g < p.n_groups; ++g) {
      const __m512 lut = round_lut(
          _mm512_mul_ps(_mm512_loadu_ps(p.table + 16 * bitmod_type(p, r, g)), _mm512_set1_ps(bitmod_scale(p, r, g))),
          p.round_mode);
      const uint8_t* c = row_codes + g * gbytes;
      const float* xg = p.x + g * gp;
      if (p.bits == 4) {
        for (int64_t j = 0; j < half; j += 16) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
          const __m512 lo = _mm512_permutexvar_ps(b, lut);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
          for (int mb = 0; mb < MB; ++mb) {
            acc[mb] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xg + mb * p.ldx + j), acc[mb]);
            acc[mb] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + mb * p.ldx + half + j), acc[mb]);
          }
        }
      } else {
        const uint8_t* plane1 = c + q;
        for (int64_t j = 0; j < q; j += 16) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
          for (int k = 0; k < 4; ++k) {
            uint16_t high;
            __builtin_memcpy(&high, plane1 + (j + k * q) / 8, 2);
            __m512i idx = _mm512_and_si512(_mm512_srli_epi32(b, 2 * k), _mm512_set1_epi32(3));
            idx = _mm512_mask_or_epi32(idx, static_cast<__mmask16>(high), idx, _mm512_set1_epi32(4));
            const __m512 w = _mm512_permutexvar_ps(idx, lut);
            for (int mb = 0; mb < MB; ++mb)
              acc[mb] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + mb * p.ldx + k * q + j), acc[mb]);
          }
        }
      }
    }
    const float bias = p.bias ? p.bias[r] : 0.0f;
    for (int mb = 0; mb < MB; ++mb) p.out[mb * p.ldo + r] = hsum(acc[mb]) + bias;
  }
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
