// Sparse KV-cache attention, the float32 strip products (F32Problem in sparse_kernels.h) without AVX-512:
// a portable one that walks the bitmaps bit by bit, and an AVX2 + FMA one. AVX2 has no expand-load, so each
// tile row is expanded 8 bf16 at a time by a byte shuffle (pshufb) whose control comes from a 256-entry table
// indexed by 8 bits of the bitmap. Compiled with no target flags except inside the AVX2 section.
#include "sparse_kernels.h"

#include <cpuid.h>
#include <immintrin.h>

namespace {
constexpr int kRowsPerTile = 16;
constexpr int kStrip = 16;
constexpr int kMaxRows = 8;  // rows of x per pass of the portable kernel

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
}  // namespace

extern "C" CpuInfoX86 effllm_cpu_probe_avx2() {
  CpuInfoX86 info{};
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return info;
  const bool osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u;
  info.fma = (c >> 12) & 1u;
  info.os_avx = osxsave && avx && (xgetbv0() & 0x6) == 0x6;  // XMM + YMM state
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    info.avx2 = (b >> 5) & 1u;
  }
  return info;
}

// bitmaps == nullptr (both kernels): the dense layout, every value of every tile in tile order, strip s at
// s * k_tiles * 512 (strip_offsets unused); the same loops with every mask bit set.
extern "C" void spmv_f32_portable(const F32Problem& p, int64_t strip_begin, int64_t strip_end) {
  const bool dense = p.bitmaps == nullptr;
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    for (int64_t m0 = 0; m0 < p.m; m0 += kMaxRows) {
      const int64_t rows = p.m - m0 < kMaxRows ? p.m - m0 : kMaxRows;
      float acc[kMaxRows][kStrip] = {};
      const uint16_t* v = p.values + (dense ? s * p.k_tiles * kRowsPerTile * 32 : p.strip_offsets[s]);
      const int32_t* bm = dense ? nullptr : p.bitmaps + s * p.k_tiles * kRowsPerTile;
      for (int64_t t = 0; t < p.k_tiles; ++t) {
        for (int r = 0; r < kRowsPerTile; ++r) {
          uint32_t mask = dense ? 0xffffffffu : static_cast<uint32_t>(bm[t * kRowsPerTile + r]);
          const int64_t k0 = t * 32 + 2 * r;
          while (mask) {
            const int c = __builtin_ctz(mask);
            mask &= mask - 1;
            const float w = bf16_to_float(*v++);
            const float* xk = p.x + m0 * p.ldx + k0 + (c & 1);
            for (int64_t i = 0; i < rows; ++i) acc[i][c >> 1] += w * xk[i * p.ldx];
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int j = 0; j < kStrip; ++j) p.out[(m0 + i) * p.ldo + (s - p.strip_base) * kStrip + j] = acc[i][j];
    }
  }
}

namespace {
// Built at load time by plain code (outside the AVX2 section: a static constructor runs on any CPU).
// kExpand[m]: pshufb control that moves the first popcount(m) 16-bit values of a 16-byte load to the
// positions of m's set bits (zero elsewhere).
struct ExpandTable {
  alignas(16) uint8_t ctrl[256][16];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int src = 0;
      for (int i = 0; i < 8; ++i) {
        if ((m >> i) & 1) {
          ctrl[m][2 * i] = static_cast<uint8_t>(2 * src);
          ctrl[m][2 * i + 1] = static_cast<uint8_t>(2 * src + 1);
          ++src;
        } else {
          ctrl[m][2 * i] = ctrl[m][2 * i + 1] = 0x80;
        }
      }
    }
  }
};
const ExpandTable kExpand;

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")

namespace {
// 8 outputs (16 bf16 of a tile row: 8 pairs) as 8 dwords; the low half of dword i is the weight of input
// k0, the high half that of input k0 + 1.
inline __m256i expand16(const uint16_t*& v, uint32_t bits16) {
  const uint32_t lo_bits = bits16 & 0xff, hi_bits = bits16 >> 8;
  const __m128i lo = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)),
                                      _mm_load_si128(reinterpret_cast<const __m128i*>(kExpand.ctrl[lo_bits])));
  v += __builtin_popcount(lo_bits);
  const __m128i hi = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)),
                                      _mm_load_si128(reinterpret_cast<const __m128i*>(kExpand.ctrl[hi_bits])));
  v += __builtin_popcount(hi_bits);
  return _mm256_set_m128i(hi, lo);
}

// One strip for B rows of x from m0: separate accumulators for the two inputs of a pair and the two halves
// of the strip keep four independent FMA chains per row.
template <int B, bool Dense>
void strip_rows_avx2(const F32Problem& p, int64_t s, int64_t m0) {
  __m256 acc_even[B][2], acc_odd[B][2];
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < 2; ++h) acc_even[b][h] = acc_odd[b][h] = _mm256_setzero_ps();
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const uint16_t* v = Dense ? p.values + s * p.k_tiles * kRowsPerTile * 32 : p.values + p.strip_offsets[s];
  const uint32_t* bm = Dense ? nullptr : reinterpret_cast<const uint32_t*>(p.bitmaps) + s * p.k_tiles * kRowsPerTile;
  const float* x0 = p.x + m0 * p.ldx;
  for (int64_t t = 0; t < p.k_tiles; ++t) {
    for (int r = 0; r < kRowsPerTile; ++r) {
      const uint32_t mask = Dense ? 0xffffffffu : bm[t * kRowsPerTile + r];
      const int64_t k0 = t * 32 + 2 * r;
      if (mask == 0) continue;
      for (int h = 0; h < 2; ++h) {
        __m256i w;
        if constexpr (Dense) {  // 16 stored values = what expand16 makes of an all-ones half-row
          w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
          v += 16;
        } else {
          w = expand16(v, (mask >> (16 * h)) & 0xffff);
        }
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(w, high_half));
        for (int b = 0; b < B; ++b) {
          acc_even[b][h] = _mm256_fmadd_ps(we, _mm256_broadcast_ss(x0 + b * p.ldx + k0), acc_even[b][h]);
          acc_odd[b][h] = _mm256_fmadd_ps(wo, _mm256_broadcast_ss(x0 + b * p.ldx + k0 + 1), acc_odd[b][h]);
        }
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    float* o = p.out + (m0 + b) * p.ldo + (s - p.strip_base) * kStrip;
    _mm256_storeu_ps(o, _mm256_add_ps(acc_even[b][0], acc_odd[b][0]));
    _mm256_storeu_ps(o + 8, _mm256_add_ps(acc_even[b][1], acc_odd[b][1]));
  }
}

template <bool Dense>
void strips_avx2(const F32Problem& p, int64_t strip_begin, int64_t strip_end) {
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    int64_t m0 = 0;
    for (; m0 + 2 <= p.m; m0 += 2) strip_rows_avx2<2, Dense>(p, s, m0);
    if (m0 < p.m) strip_rows_avx2<1, Dense>(p, s, m0);
  }
}
}  // namespace

extern "C" void spmv_f32_avx2(const F32Problem& p, int64_t strip_begin, int64_t strip_end) {
  if (p.bitmaps == nullptr)
    strips_avx2<true>(p, strip_begin, strip_end);
  else
    strips_avx2<false>(p, strip_begin, strip_end);
}

#pragma GCC pop_options
