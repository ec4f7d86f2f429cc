// PQ lookup kernels for a CPU: encode each sub-vector to a 4-bit code (nearest prototype, or a MADDNESS-style
// hash tree), then sum int8 table entries with in-register lookups.
//
// Layouts (all prepared by lut_kernel.py):
//   x      float [B, D, R]        feature-major rows (NCHW for a 1x1 conv: R = H*W); rows contiguous
//   codes  uint8 [B, S4, Rp]      one code (0..15) per subspace and row; S4 = N_s rounded up to 4 (padding
//                                 subspaces hold code 0 and all-zero tables), Rp = R rounded up to 64
//   tables int8  [S4/4, C, 64]    group g, output c: bytes 16*j + p = LUT[4g+j, p, c] (int8, per-c scale)
//   out    float [B, C, R]        out[b, c, r] = scale[c] * sum_s tables[s, codes[s, r], c] + bias[c]
//
// Kernels, chosen at run time (never one whose instructions the CPU or OS lacks):
//   portable     plain C++ (the compiler's baseline x86-64 flags)
//   avx2         vpshufb: a 16-entry table per 128-bit lane, 32 rows per instruction, int16 sums
//   avx512_vbmi  vpermb: one 64-byte register holds the tables of 4 subspaces, 16 rows x 4 subspaces per
//                instruction, and vpdpbusd (VNNI) sums the 4 looked-up bytes of a row into its int32
// Every entry point returns a std::string, empty on success (the sparse chapter's convention: no exception or
// iostream formatting crosses the extension boundary; see effllm_lib/sparse/kernels/bindings.cpp).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

namespace {

constexpr int kRowPad = 64;
constexpr int64_t kChunkRows = 256;  // rows per lookup task (a multiple of 64)
constexpr int kI16Chunk = 256;  // int16 sums of up to 256 entries of |v| <= 127 cannot overflow (256*127 < 32767)

// ------------------------------------------------------------------------------------------------ CPU probe
struct Cpu {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512vbmi = false,
       avx512vnni = false, os_avx = false, os_avx512 = false;
};

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

Cpu probe() {
  Cpu c;
  unsigned a, b, cc, d;
  if (!__get_cpuid(1, &a, &b, &cc, &d)) return c;
  c.fma = (cc >> 12) & 1;
  const bool osxsave = (cc >> 27) & 1, avx = (cc >> 28) & 1;
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  c.os_avx = avx && (xcr0 & 0x6) == 0x6;        // XMM and YMM state saved by the OS
  c.os_avx512 = c.os_avx && (xcr0 & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return c;
  __cpuid_count(7, 0, a, b, cc, d);
  c.avx2 = (b >> 5) & 1;
  c.avx512f = (b >> 16) & 1;
  c.avx512bw = (b >> 30) & 1;
  c.avx512vl = (b >> 31) & 1;
  c.avx512vbmi = (cc >> 1) & 1;
  c.avx512vnni = (cc >> 11) & 1;
  return c;
}

const Cpu& cpu() {
  static const Cpu c = probe();
  return c;
}

bool can_avx2() { return cpu().os_avx && cpu().avx2 && cpu().fma; }
bool can_avx512_vbmi() {
  const Cpu& c = cpu();
  return can_avx2() && c.os_avx512 && c.avx512f && c.avx512bw && c.avx512vl && c.avx512vbmi && c.avx512vnni;
}

// ------------------------------------------------------------------------------------------------ encoders
struct EncodeArgs {
  const float* x;        // [B, D, R]
  uint8_t* codes;        // [B, S4, Rp]
  int64_t D, R, Rp, S4, n_sub, sub_len;
  const float* protos;   // exact: [n_sub, 16, sub_len] (padding coordinates zero)
  const float* proto_sq; // exact: [n_sub, 16]
  const int32_t* dims;   // tree: [n_sub, 4] feature index per level
  const float* thr;      // tree: [n_sub, 4, 8] thresholds per level and node (level l uses 2^l)
};

// argmin_p |P_p|^2 - 2 x.P_p (|x|^2 is common to all p); strict < keeps the lowest index on ties
void encode_exact_portable(const EncodeArgs& a, int64_t b, int64_t r0, int64_t r1) {
  const float* xb = a.x + b * a.D * a.R;
  for (int64_t s = 0; s < a.n_sub; ++s) {
    const int64_t d0 = s * a.sub_len, len = std::min(a.sub_len, a.D - d0);
    uint8_t* out = a.codes + (b * a.S4 + s) * a.Rp;
    for (int64_t r = r0; r < r1; ++r) {
      float best = 0.f;
      int best_p = 0;
      for (int p = 0; p < 16; ++p) {
        const float* P = a.protos + (s * 16 + p) * a.sub_len;
        float dot = 0.f;
        for (int64_t l = 0; l < len; ++l) dot += xb[(d0 + l) * a.R + r] * P[l];
        const float dist = a.proto_sq[s * 16 + p] - 2.f * dot;
        if (p == 0 || dist < best) { best = dist; best_p = p; }
      }
      out[r] = static_cast<uint8_t>(best_p);
    }
  }
}

void encode_tree_portable(const EncodeArgs& a, int64_t b, int64_t r0, int64_t r1) {
  const float* xb = a.x + b * a.D * a.R;
  for (int64_t s = 0; s < a.n_sub; ++s) {
    uint8_t* out = a.codes + (b * a.S4 + s) * a.Rp;
    for (int64_t r = r0; r < r1; ++r) {
      int node = 0;
      for (int l = 0; l < 4; ++l) {
        const float v = xb[a.dims[s * 4 + l] * a.R + r];
        node = 2 * node + (v > a.thr[(s * 4 + l) * 8 + node] ? 1 : 0);
      }
      out[r] = static_cast<uint8_t>(node);
    }
  }
}

__attribute__((target("avx2,fma"))) void store_codes8(uint8_t* dst, __m256i idx) {
  alignas(32) int32_t tmp[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), idx);
  for (int i = 0; i < 8; ++i) dst[i] = static_cast<uint8_t>(tmp[i]);
}

// L > 0: the sub-vector length, known at compile time so its 8-row slices stay in registers (the dispatcher
// uses it only when every subspace is full, D % L_s == 0); L = 0: any length.
template <int L>
__attribute__((target("avx2,fma"))) void encode_exact_avx2_t(const EncodeArgs& a, int64_t b, int64_t r0,
                                                               int64_t r1) {
  const float* xb = a.x + b * a.D * a.R;
  const int64_t full = r0 + (r1 - r0) / 8 * 8;
  for (int64_t s = 0; s < a.n_sub; ++s) {
    const int64_t d0 = s * a.sub_len, len = std::min(a.sub_len, a.D - d0);
    uint8_t* out = a.codes + (b * a.S4 + s) * a.Rp;
    for (int64_t r = r0; r < full; r += 8) {
      __m256 xv[L > 0 ? L : 1];
      if (L > 0)
        for (int l = 0; l < L; ++l) xv[l] = _mm256_loadu_ps(xb + (d0 + l) * a.R + r);
      __m256 best = _mm256_set1_ps(0.f);
      __m256i best_p = _mm256_setzero_si256();
      for (int p = 0; p < 16; ++p) {
        const float* P = a.protos + (s * 16 + p) * a.sub_len;
        __m256 dot = _mm256_setzero_ps();
        if (L > 0) {
          for (int l = 0; l < L; ++l) dot = _mm256_fmadd_ps(xv[l], _mm256_set1_ps(P[l]), dot);
        } else {
          for (int64_t l = 0; l < len; ++l)
            dot = _mm256_fmadd_ps(_mm256_loadu_ps(xb + (d0 + l) * a.R + r), _mm256_set1_ps(P[l]), dot);
        }
        const __m256 dist = _mm256_fnmadd_ps(_mm256_set1_ps(2.f), dot, _mm256_set1_ps(a.proto_sq[s * 16 + p]));
        if (p == 0) {
          best = dist;
          continue;
        }
        const __m256 lt = _mm256_cmp_ps(dist, best, _CMP_LT_OQ);
        best = _mm256_blendv_ps(best, dist, lt);
        best_p = _mm256_blendv_epi8(best_p, _mm256_set1_epi32(p), _mm256_castps_si256(lt));
      }
      store_codes8(out + r, best_p);
    }
  }
  if (full < r1) encode_exact_portable(a, b, full, r1);
}

void encode_exact_avx2(const EncodeArgs& a, int64_t b, int64_t r0, int64_t r1) {
  const bool even = a.D % a.sub_len == 0;
  if (even && a.sub_len == 4) return encode_exact_avx2_t<4>(a, b, r0, r1);
  if (even && a.sub_len == 8) return encode_exact_avx2_t<8>(a, b, r0, r1);
  encode_exact_avx2_t<0>(a, b, r0, r1);
}

// The same with 16 rows per register and mask registers for the running argmin.
template <int L>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void encode_exact_avx512_t(const EncodeArgs& a,
                                                                                         int64_t b, int64_t r0,
                                                                                         int64_t r1) {
  const float* xb = a.x + b * a.D * a.R;
  const int64_t full = r0 + (r1 - r0) / 16 * 16;
  for (int64_t s = 0; s < a.n_sub; ++s) {
    const int64_t d0 = s * a.sub_len, len = std::min(a.sub_len, a.D - d0);
    uint8_t* out = a.codes + (b * a.S4 + s) * a.Rp;
    for (int64_t r = r0; r < full; r += 16) {
      __m512 xv[L > 0 ? L : 1];
      if (L > 0)
        for (int l = 0; l < L; ++l) xv[l] = _mm512_loadu_ps(xb + (d0 + l) * a.R + r);
      __m512 best = _mm512_set1_ps(0.f);
      __m512i best_p = _mm512_setzero_si512();
      for (int p = 0; p < 16; ++p) {
        const float* P = a.protos + (s * 16 + p) * a.sub_len;
        __m512 dot = _mm512_setzero_ps();
        if (L > 0) {
          for (int l = 0; l < L; ++l) dot = _mm512_fmadd_ps(xv[l], _mm512_set1_ps(P[l]), dot);
        } else {
          for (int64_t l = 0; l < len; ++l)
            dot = _mm512_fmadd_ps(_mm512_loadu_ps(xb + (d0 + l) * a.R + r), _mm512_set1_ps(P[l]), dot);
        }
        const __m512 dist = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), dot, _mm512_set1_ps(a.proto_sq[s * 16 + p]));
        if (p == 0) {
          best = dist;
          continue;
        }
        const __mmask16 lt = _mm512_cmp_ps_mask(dist, best, _CMP_LT_OQ);
        best = _mm512_mask_mov_ps(best, lt, dist);
        best_p = _mm512_mask_mov_epi32(best_p, lt, _mm512_set1_epi32(p));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r), _mm512_cvtepi32_epi8(best_p));
    }
  }
  if (full < r1) encode_exact_portable(a, b, full, r1);
}

void encode_exact_avx512(const EncodeArgs& a, int64_t b, int64_t r0, int64_t r1) {
  const bool even = a.D % a.sub_len == 0;
  if (even && a.sub_len == 4) return encode_exact_avx512_t<4>(a, b, r0, r1);
  if (even && a.sub_len == 8) return encode_exact_avx512_t<8>(a, b, r0, r1);
  encode_exact_avx512_t<0>(a, b, r0, r1);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void encode_tree_avx512(const EncodeArgs& a,
                                                                                      int64_t b, int64_t r0,
                                                                                      int64_t r1) {
  const float* xb = a.x + b * a.D * a.R;
  const int64_t full = r0 + (r1 - r0) / 16 * 16;
  for (int64_t s = 0; s < a.n_sub; ++s) {
    uint8_t* out = a.codes + (b * a.S4 + s) * a.Rp;
    __m512 thr[4];
    for (int l = 0; l < 4; ++l) thr[l] = _mm512_castps256_ps512(_mm256_loadu_ps(a.thr + (s * 4 + l) * 8));
    for (int64_t r = r0; r < full; r += 16) {
      __m512i node = _mm512_setzero_si512();
      for (int l = 0; l < 4; ++l) {
        const __m512 v = _mm512_loadu_ps(xb + a.dims[s * 4 + l] * a.R + r);
        const __m512 t = _mm512_permutexvar_ps(node, thr[l]);  // node < 8: the loaded half
        const __mmask16 gt = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
        node = _mm512_mask_add_epi32(_mm512_add_epi32(node, node), gt, _mm512_add_epi32(node, node),
                                     _mm512_set1_epi32(1));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r), _mm512_cvtepi32_epi8(node));
    }
  }
  if (full < r1) encode_tree_portable(a, b, full, r1);
}

__attribute__((target("avx2,fma"))) void encode_tree_avx2(const EncodeArgs& a, int64_t b, int64_t r0, int64_t r1) {
  const float* xb = a.x + b * a.D * a.R;
  const int64_t full = r0 + (r1 - r0) / 8 * 8;
  for (int64_t s = 0; s < a.n_sub; ++s) {
    uint8_t* out = a.codes + (b * a.S4 + s) * a.Rp;
    __m256 thr[4];
    for (int l = 0; l < 4; ++l) thr[l] = _mm256_loadu_ps(a.thr + (s * 4 + l) * 8);
    for (int64_t r = r0; r < full; r += 8) {
      __m256i node = _mm256_setzero_si256();
      for (int l = 0; l < 4; ++l) {
        const __m256 v = _mm256_loadu_ps(xb + a.dims[s * 4 + l] * a.R + r);
        const __m256 t = _mm256_permutevar8x32_ps(thr[l], node);
        const __m256i gt = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cmp_ps(v, t, _CMP_GT_OQ)), 31);
        node = _mm256_add_epi32(_mm256_add_epi32(node, node), gt);
      }
      store_codes8(out + r, node);
    }
  }
  if (full < r1) encode_tree_portable(a, b, full, r1);
}

// ------------------------------------------------------------------------------------------------ lookups
struct LookupArgs {
  const uint8_t* codes;  // [B, S4, Rp]
  const int8_t* tables;  // [S4/4, C, 64]
  const float* scale;    // [C]
  const float* bias;     // [C] or null
  float* out;            // [B, C, R], any strides (a linear layer's [M, C] output is [1, C, M] with stride_r = C)
  int64_t stride_b, stride_c, stride_r;
  int64_t R, Rp, S4, C;
};

inline void store_rows(const LookupArgs& a, int64_t b, int64_t c, int64_t r, const float* v, int64_t n) {
  n = std::min<int64_t>(n, a.R - r);
  float* dst = a.out + b * a.stride_b + c * a.stride_c + r * a.stride_r;
  if (a.stride_r == 1) {
    std::memcpy(dst, v, sizeof(float) * n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * a.stride_r] = v[i];
  }
}

void lookup_portable(const LookupArgs& a, int64_t b, int64_t r0, int64_t r1, int64_t c_lo, int64_t c_hi) {
  const uint8_t* cb = a.codes + b * a.S4 * a.Rp;
  float row[kRowPad];
  for (int64_t c = c_lo; c < c_hi; ++c) {
    for (int64_t r = r0; r < r1; r += kRowPad) {
      const int64_t n = std::min<int64_t>(kRowPad, r1 - r);
      for (int64_t i = 0; i < n; ++i) {
        int32_t acc = 0;
        for (int64_t s = 0; s < a.S4; ++s)
          acc += a.tables[((s / 4) * a.C + c) * 64 + 16 * (s % 4) + cb[s * a.Rp + r + i]];
        row[i] = static_cast<float>(acc) * a.scale[c] + (a.bias ? a.bias[c] : 0.f);
      }
      store_rows(a, b, c, r, row, n);
    }
  }
}

// 32 rows x 4 outputs per block; int16 sums over chunks of 256 subspaces, then int32.
__attribute__((target("avx2,fma"))) void lookup_avx2(const LookupArgs& a, int64_t b, int64_t r0, int64_t r1,
                                                     int64_t c_lo, int64_t c_hi) {
  constexpr int CB = 4;
  const uint8_t* cb = a.codes + b * a.S4 * a.Rp;
  alignas(32) int32_t acc32[CB][32];
  alignas(32) float row[32];
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += CB) {  // outputs outer: their tables stay in L1 across the rows
    for (int64_t r = r0; r < r1; r += 32) {
      const int nc = static_cast<int>(std::min<int64_t>(CB, c_hi - c0));
      std::memset(acc32, 0, sizeof(acc32));
      for (int64_t s0 = 0; s0 < a.S4; s0 += kI16Chunk) {
        const int64_t s1 = std::min<int64_t>(a.S4, s0 + kI16Chunk);
        __m256i lo[CB], hi[CB];
        for (int k = 0; k < CB; ++k) lo[k] = hi[k] = _mm256_setzero_si256();
        for (int64_t s = s0; s < s1; ++s) {
          const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + s * a.Rp + r));
          const int8_t* tg = a.tables + ((s / 4) * a.C + c0) * 64 + 16 * (s % 4);
          for (int k = 0; k < CB; ++k) {
            if (k >= nc) break;
            const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tg + k * 64)));
            const __m256i v = _mm256_shuffle_epi8(t, codes);
            lo[k] = _mm256_add_epi16(lo[k], _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)));
            hi[k] = _mm256_add_epi16(hi[k], _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)));
          }
        }
        for (int k = 0; k < nc; ++k) {
          __m256i* d = reinterpret_cast<__m256i*>(acc32[k]);
          d[0] = _mm256_add_epi32(d[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo[k])));
          d[1] = _mm256_add_epi32(d[1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo[k], 1)));
          d[2] = _mm256_add_epi32(d[2], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi[k])));
          d[3] = _mm256_add_epi32(d[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi[k], 1)));
        }
      }
      for (int k = 0; k < nc; ++k) {
        const __m256 sc = _mm256_set1_ps(a.scale[c0 + k]), bi = _mm256_set1_ps(a.bias ? a.bias[c0 + k] : 0.f);
        for (int i = 0; i < 4; ++i) {
          const __m256 v = _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(acc32[k]) + i));
          _mm256_store_ps(row + 8 * i, _mm256_fmadd_ps(v, sc, bi));
        }
        store_rows(a, b, c0 + k, r, row, std::min<int64_t>(32, r1 - r));
      }
    }
  }
}

// Codes of 16 rows x subspaces 4g..4g+3, interleaved for vpermb: byte 4i + j = code[4g+j][r+i] + 16 j.
__attribute__((target("avx2,fma"))) void interleave16(const uint8_t* c0, const uint8_t* c1, const uint8_t* c2,
                                                     const uint8_t* c3, uint8_t* dst) {
  const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c0));
  const __m128i a1 = _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c1)), _mm_set1_epi8(16));
  const __m128i a2 = _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c2)), _mm_set1_epi8(32));
  const __m128i a3 = _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c3)), _mm_set1_epi8(48));
  const __m128i p01l = _mm_unpacklo_epi8(a0, a1), p01h = _mm_unpackhi_epi8(a0, a1);
  const __m128i p23l = _mm_unpacklo_epi8(a2, a3), p23h = _mm_unpackhi_epi8(a2, a3);
  __m128i* d = reinterpret_cast<__m128i*>(dst);
  _mm_storeu_si128(d + 0, _mm_unpacklo_epi16(p01l, p23l));
  _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(p01l, p23l));
  _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(p01h, p23h));
  _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(p01h, p23h));
}

// 64 rows (4 blocks of 16) x 4 outputs per block; every table register feeds 4 row blocks.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma"))) void lookup_avx512_vbmi(
    const LookupArgs& a, int64_t b, int64_t r0, int64_t r1, int64_t c_lo, int64_t c_hi, uint8_t* scratch) {
  constexpr int CB = 4, RB = 4;
  const int64_t G = a.S4 / 4;
  const uint8_t* cb = a.codes + b * a.S4 * a.Rp;
  const __m512i ones = _mm512_set1_epi8(1);
  alignas(64) float row[64];
  // interleave the chunk's codes once, every output reuses them: scratch [row block of 64][G][RB][64]
  for (int64_t r = r0; r < r1; r += 64)
    for (int64_t g = 0; g < G; ++g)
      for (int rb = 0; rb < RB; ++rb) {
        const uint8_t* base = cb + 4 * g * a.Rp + r + 16 * rb;
        interleave16(base, base + a.Rp, base + 2 * a.Rp, base + 3 * a.Rp,
                     scratch + (((r - r0) / 64 * G + g) * RB + rb) * 64);
      }
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += CB) {  // outputs outer: their tables stay in L1 across the rows
    const int nc = static_cast<int>(std::min<int64_t>(CB, c_hi - c0));
    for (int64_t r = r0; r < r1; r += 64) {
      const uint8_t* blk = scratch + (r - r0) / 64 * G * RB * 64;
      __m512i acc[RB][CB];
      for (int rb = 0; rb < RB; ++rb)
        for (int k = 0; k < CB; ++k) acc[rb][k] = _mm512_setzero_si512();
      for (int64_t g = 0; g < G; ++g) {
        __m512i codes[RB];
        for (int rb = 0; rb < RB; ++rb) codes[rb] = _mm512_load_si512(blk + (g * RB + rb) * 64);
        const int8_t* tg = a.tables + (g * a.C + c0) * 64;
        for (int k = 0; k < CB; ++k) {
          if (k >= nc) break;
          const __m512i t = _mm512_loadu_si512(tg + k * 64);
          for (int rb = 0; rb < RB; ++rb)
            acc[rb][k] = _mm512_dpbusd_epi32(acc[rb][k], ones, _mm512_permutexvar_epi8(codes[rb], t));
        }
      }
      for (int k = 0; k < nc; ++k) {
        const __m512 sc = _mm512_set1_ps(a.scale[c0 + k]), bi = _mm512_set1_ps(a.bias ? a.bias[c0 + k] : 0.f);
        for (int rb = 0; rb < RB; ++rb)
          _mm512_store_ps(row + 16 * rb, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[rb][k]), sc, bi));
        store_rows(a, b, c0 + k, r, row, std::min<int64_t>(64, r1 - r));
      }
    }
  }
}

bool known(const std::string& k) { return k == "portable" || k == "avx2" || k == "avx512_vbmi"; }

std::string check_kernel(const std::string& k) {
  if (!known(k)) return "unknown kernel '" + k + "' (portable, avx2, avx512_vbmi)";
  if (k == "avx2" && !can_avx2()) return "kernel 'avx2' cannot run on this CPU/OS (needs AVX2 + FMA, YMM state)";
  if (k == "avx512_vbmi" && !can_avx512_vbmi())
    return "kernel 'avx512_vbmi' cannot run on this CPU/OS (needs AVX512F/BW/VL + VBMI + VNNI, ZMM state)";
  return {};
}

std::string check_strided(const torch::Tensor& t, const char* name, c10::ScalarType dtype, int64_t dim) {
  if (!t.defined() || !t.device().is_cpu()) return std::string(name) + " must be a CPU tensor";
  if (t.scalar_type() != dtype) return std::string(name) + " has the wrong dtype";
  if (t.dim() != dim) return std::string(name) + " has the wrong number of dimensions";
  for (int64_t d = 0; d < dim; ++d)
    if (t.stride(d) < 1) return std::string(name) + " must have positive strides";
  return {};
}

std::string check(const torch::Tensor& t, const char* name, c10::ScalarType dtype, int64_t dim) {
  if (!t.defined() || !t.device().is_cpu() || !t.is_contiguous()) return std::string(name) + " must be a contiguous CPU tensor";
  if (t.scalar_type() != dtype) return std::string(name) + " has the wrong dtype";
  if (t.dim() != dim) return std::string(name) + " has the wrong number of dimensions";
  return {};
}

}  // namespace

std::vector<std::string> available_kernels() {
  std::vector<std::string> k{"portable"};
  if (can_avx2()) k.push_back("avx2");
  if (can_avx512_vbmi()) k.push_back("avx512_vbmi");
  return k;
}

// encoder: "exact" (protos, proto_sq) or "tree" (dims, thr)
std::string encode(const torch::Tensor& x, torch::Tensor codes, int64_t n_sub, int64_t sub_len,
                   const std::string& encoder, const torch::Tensor& protos, const torch::Tensor& proto_sq,
                   const torch::Tensor& dims, const torch::Tensor& thr, const std::string& kernel) {
  std::string err = check_kernel(kernel);
  if (err.empty()) err = check(x, "x", torch::kFloat, 3);
  if (err.empty()) err = check(codes, "codes", torch::kUInt8, 3);
  if (!err.empty()) return err;
  EncodeArgs a{};
  a.x = x.data_ptr<float>();
  a.codes = codes.data_ptr<uint8_t>();
  a.D = x.size(1), a.R = x.size(2), a.Rp = codes.size(2), a.S4 = codes.size(1), a.n_sub = n_sub, a.sub_len = sub_len;
  if (codes.size(0) != x.size(0) || a.Rp < a.R || a.S4 < n_sub || n_sub * sub_len < a.D || (n_sub - 1) * sub_len >= a.D)
    return "encode: codes/x/subspace sizes disagree";
  if (encoder == "exact") {
    if (!(err = check(protos, "protos", torch::kFloat, 3)).empty() ||
        !(err = check(proto_sq, "proto_sq", torch::kFloat, 2)).empty()) return err;
    if (protos.size(0) != n_sub || protos.size(1) != 16 || protos.size(2) != sub_len) return "protos must be [N_s, 16, L_s]";
    a.protos = protos.data_ptr<float>();
    a.proto_sq = proto_sq.data_ptr<float>();
  } else if (encoder == "tree") {
    if (!(err = check(dims, "dims", torch::kInt, 2)).empty() || !(err = check(thr, "thr", torch::kFloat, 3)).empty()) return err;
    if (dims.size(0) != n_sub || dims.size(1) != 4 || thr.size(0) != n_sub || thr.size(1) != 4 || thr.size(2) != 8)
      return "tree: dims must be [N_s, 4] and thr [N_s, 4, 8]";
    if (dims.min().item<int32_t>() < 0 || dims.max().item<int32_t>() >= a.D) return "tree: a split feature is out of range";
    a.dims = dims.data_ptr<int32_t>();
    a.thr = thr.data_ptr<float>();
  } else {
    return "encoder must be 'exact' or 'tree'";
  }
  const bool tree = encoder == "tree";
  const int level = kernel == "avx512_vbmi" ? 2 : kernel == "avx2" ? 1 : 0;
  const int64_t B = x.size(0), chunk = 256, per_b = (a.R + chunk - 1) / chunk;
  at::parallel_for(0, B * per_b, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / per_b, r0 = (u % per_b) * chunk, r1 = std::min(a.R, r0 + chunk);
      if (tree) {
        if (level == 2) encode_tree_avx512(a, b, r0, r1);
        else if (level == 1) encode_tree_avx2(a, b, r0, r1);
        else encode_tree_portable(a, b, r0, r1);
      } else {
        if (level == 2) encode_exact_avx512(a, b, r0, r1);
        else if (level == 1) encode_exact_avx2(a, b, r0, r1);
        else encode_exact_portable(a, b, r0, r1);
      }
    }
  });
  return {};
}

std::string lookup(const torch::Tensor& codes, const torch::Tensor& tables, const torch::Tensor& scale,
                   const c10::optional<torch::Tensor>& bias, torch::Tensor out, const std::string& kernel) {
  std::string err = check_kernel(kernel);
  if (err.empty()) err = check(codes, "codes", torch::kUInt8, 3);
  if (err.empty()) err = check(tables, "tables", torch::kChar, 3);
  if (err.empty()) err = check(scale, "scale", torch::kFloat, 1);
  if (err.empty()) err = check_strided(out, "out", torch::kFloat, 3);
  if (err.empty() && bias.has_value()) err = check(*bias, "bias", torch::kFloat, 1);
  if (!err.empty()) return err;
  LookupArgs a{};
  a.S4 = codes.size(1), a.Rp = codes.size(2), a.C = out.size(1), a.R = out.size(2);
  if (a.S4 % 4 || a.Rp % kRowPad || a.Rp < a.R || tables.size(0) * 4 != a.S4 || tables.size(1) != a.C ||
      tables.size(2) != 64 || scale.numel() != a.C || out.size(0) != codes.size(0) || (bias.has_value() && bias->numel() != a.C))
    return "lookup: codes/tables/scale/bias/out sizes disagree";
  a.codes = codes.data_ptr<uint8_t>();
  a.tables = tables.data_ptr<int8_t>();
  a.scale = scale.data_ptr<float>();
  a.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  a.out = out.data_ptr<float>();
  a.stride_b = out.stride(0), a.stride_c = out.stride(1), a.stride_r = out.stride(2);
  // tasks: (image, 256-row chunk, output chunk); outputs are split only as far as needed for ~4 tasks a thread
  const int64_t B = codes.size(0), chunk = kChunkRows, per_b = (a.R + chunk - 1) / chunk;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t c_chunk = a.C;
  while (B * per_b * ((a.C + c_chunk - 1) / c_chunk) < want && c_chunk > 32) c_chunk = (c_chunk / 2 + 3) / 4 * 4;
  const int64_t per_c = (a.C + c_chunk - 1) / c_chunk;
  const int64_t G = a.S4 / 4;
  at::parallel_for(0, B * per_b * per_c, 1, [&](int64_t u0, int64_t u1) {
    std::vector<uint8_t> buf(kernel == "avx512_vbmi" ? kChunkRows / 16 * G * 64 + 64 : 0);
    uint8_t* scratch = buf.empty() ? nullptr
                                   : reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t cc = u % per_c, rest = u / per_c, b = rest / per_b, r0 = (rest % per_b) * chunk;
      const int64_t r1 = std::min(a.R, r0 + chunk), c_lo = cc * c_chunk, c_hi = std::min(a.C, c_lo + c_chunk);
      if (kernel == "avx512_vbmi") lookup_avx512_vbmi(a, b, r0, r1, c_lo, c_hi, scratch);
      else if (kernel == "avx2") lookup_avx2(a, b, r0, r1, c_lo, c_hi);
      else lookup_portable(a, b, r0, r1, c_lo, c_hi);
    }
  });
  return {};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available_kernels", &available_kernels, "LUT kernels this CPU and OS can run, slowest first");
  m.def("encode", &encode, "sub-vectors -> 4-bit codes [B, S4, Rp]; returns an error message or ''");
  m.def("lookup", &lookup, "codes + int8 tables -> float outputs [B, C, R]; returns an error message or ''");
}
