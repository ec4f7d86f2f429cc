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

inline float scale_of(const GemvProblem& p, int64_t row, int64_t g) {  // F16C: exact, subnormals included
  const int64_t i = row * p.n_groups + g;
  if (p.scale_fp32) return static_cast<const float*>(p.scales)[i];
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<const uint16_t*>(p.scales)[i])));
}

// R rows at once and S accumulators per row and token (independent FMA chains; see avx512.cpp), within the
// 16 ymm registers: two rows for one token, two chains up to 4 tokens
template <int MB, int R, int S>
void row_block(const GemvProblem& p, int64_t r0) {
  const int64_t gbytes = bitmod_group_bytes(p), gp = p.gp, half = gp / 2, q = gp / 4;
  const __m256i bit_of_lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256 acc[R][MB][S];
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < MB; ++b)
      for (int s = 0; s < S; ++s) acc[i][b][s] = _mm256_setzero_ps();
  const uint8_t* row_codes[R];
  for (int i = 0; i < R; ++i) row_codes[i] = p.codes + (r0 + i) * p.n_groups * gbytes;
  for (int64_t g = 0; g < p.n_groups; ++g) {
    __m256 lut_lo[R], lut_hi[R];
    const uint8_t* c[R];
    for (int i = 0; i < R; ++i) {
      const float* values = p.table + 16 * bitmod_type(p, r0 + i, g);
      const __m256 s = _mm256_set1_ps(scale_of(p, r0 + i, g));
      lut_lo[i] = round_lut(_mm256_mul_ps(_mm256_loadu_ps(values), s), p.round_mode);
      lut_hi[i] = round_lut(_mm256_mul_ps(_mm256_loadu_ps(values + 8), s), p.round_mode);
      c[i] = row_codes[i] + g * gbytes;
    }
    const float* xg = p.x + g * gp;
    if (p.bits == 4) {
      for (int64_t j = 0; j < half; j += 8) {
        __m256 lo[R], hi[R];
        for (int i = 0; i < R; ++i) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c[i] + j)));
          lo[i] = lookup16(b, lut_lo[i], lut_hi[i]);  // bits 4-7 of b: blend reads bit 3 only after << 28
          hi[i] = lookup16(_mm256_srli_epi32(b, 4), lut_lo[i], lut_hi[i]);
        }
        for (int mb = 0; mb < MB; ++mb) {
          const __m256 xl = _mm256_loadu_ps(xg + mb * p.ldx + j), xh = _mm256_loadu_ps(xg + mb * p.ldx + half + j);
          for (int i = 0; i < R; ++i) {
            acc[i][mb][0] = _mm256_fmadd_ps(lo[i], xl, acc[i][mb][0]);
            acc[i][mb][S - 1] = _mm256_fmadd_ps(hi[i], xh, acc[i][mb][S - 1]);
          }
        }
      }
    } else {
      for (int64_t j = 0; j < q; j += 8) {
        __m256i b[R];
        for (int i = 0; i < R; ++i)
          b[i] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c[i] + j)));
        for (int k = 0; k < 4; ++k) {
          __m256 w[R];
          for (int i = 0; i < R; ++i) {
            const __m256i high_bits = _mm256_and_si256(_mm256_set1_epi32(c[i][q + (j + k * q) / 8]), bit_of_lane);
            const __m256i high = _mm256_andnot_si256(_mm256_cmpeq_epi32(high_bits, _mm256_setzero_si256()),
                                                     _mm256_set1_epi32(4));
            const __m256i idx3 = _mm256_and_si256(_mm256_srli_epi32(b[i], 2 * k), _mm256_set1_epi32(3));
            w[i] = _mm256_permutevar8x32_ps(lut_lo[i], _mm256_or_si256(idx3, high));
          }
          for (int mb = 0; mb < MB; ++mb) {
            const __m256 xv = _mm256_loadu_ps(xg + mb * p.ldx + k * q + j);
            for (int i = 0; i < R; ++i) acc[i][mb][k % S] = _mm256_fmadd_ps(w[i], xv, acc[i][mb][k % S]);
          }
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    const float bias = p.bias ? p.bias[r0 + i] : 0.0f;
    for (int mb = 0; mb < MB; ++mb) {
      __m256 sum = acc[i][mb][0];
      for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[i][mb][s]);
      p.out[mb * p.ldo + r0 + i] = hsum(sum) + bias;
    }
  }
}

template <int MB>
void rows(const GemvProblem& p, int64_t row_begin, int64_t row_end) {
  constexpr int R = MB == 1 ? 2 : 1, S = MB <= 4 ? 2 : 1;
  int64_t r = row_begin;
  for (; r + R <= row_end; r += R) row_block<MB, R, S>(p, r);
  for (; r < row_end; ++r) row_block<MB, 1, S>(p, r);
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
