// AVX2 + FMA kernel (CPUs without AVX-512, e.g. AMD Zen 2/3): the group's scaled 16-entry value set lives in two
// ymm registers; vpermps (_mm256_permutevar8x32_ps) looks up the low 3 bits in each half and a blend on bit 3
// picks the half (3-bit codes need only the first). Same layout requirement as the AVX-512 kernel.
#include <immintrin.h>

#include "bitmod_kernels.h"

// headers above keep the generic target; only the code below is compiled for avx2,fma,f16c
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {
inline __m256 round_lut(__m256 v, int mode) {
  if (mode == 1) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (mode == 2) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline __m256 lookup16(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign bit
}

template <int MB>
void rows(const GemvProblem& p, int64_t row_begin, int64_t row_end) {
  const int64_t gbytes = bitmod_group_bytes(p), gp = p.gp, half = gp / 2, q = gp / 4;
  const __m256i bit_of_lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t r = row_begin; r < row_end; ++r) {
    __m256 acc[MB];
    for (int b = 0; b < MB; ++b) acc[b] = _mm256_setzero_ps();
    const uint8_t* row_codes = p.codes + r * p.n_groups * gbytes;
    for (int64_t g = 0; g < p.n_groups; ++g) {
      const float* values = p.table + 16 * bitmod_type(p, r, g);
      const __m256 s = _mm256_set1_ps(bitmod_scale(p, r, g));
      const __m256 lut_lo = round_lut(_mm256_mul_ps(_mm256_loadu_ps(values), s), p.round_mode);
      const __m256 lut_hi = round_lut(_mm256_mul_ps(_mm256_loadu_ps(values + 8), s), p.round_mode);
      const uint8_t* c = row_codes + g * gbytes;
      const float* xg = p.x + g * gp;
      if (p.bits == 4) {
        for (int64_t j = 0; j < half; j += 8) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j)));
          const __m256 lo = lookup16(b, lut_lo, lut_hi);  // bits 4-7 of b: blend reads bit 3 only after << 28
          const __m256 hi = lookup16(_mm256_srli_epi32(b, 4), lut_lo, lut_hi);
          for (int mb = 0; mb < MB; ++mb) {
            acc[mb] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg + mb * p.ldx + j), acc[mb]);
            acc[mb] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + mb * p.ldx + half + j), acc[mb]);
          }
        }
      } else {
        const uint8_t* plane1 = c + q;
        for (int64_t j = 0; j < q; j += 8) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j)));
          for (int k = 0; k < 4; ++k) {
            const __m256i high_bits = _mm256_and_si256(_mm256_set1_epi32(plane1[(j + k * q) / 8]), bit_of_lane);
            const __m256i high = _mm256_andnot_si256(_mm256_cmpeq_epi32(high_bits, _mm256_setzero_si256()),
                                                     _mm256_set1_epi32(4));
            const __m256i idx3 = _mm256_and_si256(_mm256_srli_epi32(b, 2 * k), _mm256_set1_epi32(3));
            const __m256 w = _mm256_permutevar8x32_ps(lut_lo, _mm256_or_si256(idx3, high));
            for (int mb = 0; mb < MB; ++mb)
              acc[mb] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + mb * p.ldx + k * q + j), acc[mb]);
          }
        }
      }
    }
    const float bias = p.bias ? p.bias[r] : 0.0f;
    for (int mb = 0; mb < MB; ++mb) p.out[mb * p.ldo + r] = hsum(acc[mb]) + bias;
  }
}
}  // namespace

extern "C" void bitmod_gemv_avx2(const GemvProblem& p, int64_t row_begin, int64_t row_end) {
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
