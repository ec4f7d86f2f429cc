// Portable kernels: plain C++ that walks the bitmaps bit by bit. Compiled with no target flags, so it runs
// on any x86-64 CPU; it is the reference path of the dispatch and the fallback where AVX-512 is missing.
#include "sparse_kernels.h"

namespace {
constexpr int kRowsPerTile = 16;
constexpr int kStrip = 16;
}  // namespace

extern "C" void spmm_bf16_portable(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end) {
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    for (int64_t m = 0; m < p.m; ++m) {
      float acc[kStrip] = {0};
      const uint16_t* v = p.values + p.strip_offsets[s];
      const int32_t* bm = p.bitmaps + s * p.k_tiles * kRowsPerTile;
      const uint16_t* xm = p.x + m * p.ldx;
      for (int64_t t = 0; t < p.k_tiles; ++t) {
        for (int r = 0; r < kRowsPerTile; ++r) {
          uint32_t mask = static_cast<uint32_t>(bm[t * kRowsPerTile + r]);
          const int64_t k0 = t * 32 + 2 * r;
          while (mask) {
            const int c = __builtin_ctz(mask);
            mask &= mask - 1;
            acc[c >> 1] += bf16_to_float(*v++) * bf16_to_float(xm[k0 + (c & 1)]);
          }
        }
      }
      for (int j = 0; j < kStrip; ++j) {
        const int64_t n = s * kStrip + j;
        if (n >= p.n) break;
        p.out[m * p.ldo + n] = float_to_bf16(acc[j] + (p.bias ? p.bias[n] : 0.0f));
      }
    }
  }
}

extern "C" void spmm_int8_portable(const Int8Problem& p, int64_t strip_begin, int64_t strip_end) {
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    for (int64_t m = 0; m < p.m; ++m) {
      int32_t acc[kStrip] = {0};
      const int8_t* v = p.values + p.strip_offsets[s];
      const int64_t* bm = p.bitmaps + s * p.k_tiles * kRowsPerTile;
      const int8_t* xm = p.x + m * p.ldx;
      for (int64_t t = 0; t < p.k_tiles; ++t) {
        for (int r = 0; r < kRowsPerTile; ++r) {
          uint64_t mask = static_cast<uint64_t>(bm[t * kRowsPerTile + r]);
          const int64_t k0 = t * 64 + 4 * r;
          while (mask) {
            const int c = __builtin_ctzll(mask);
            mask &= mask - 1;
            acc[c >> 2] += static_cast<int32_t>(*v++) * static_cast<int32_t>(xm[k0 + (c & 3)]);
          }
        }
      }
      for (int j = 0; j < kStrip; ++j) {
        const int64_t n = s * kStrip + j;
        if (n >= p.n) break;
        const float y = static_cast<float>(acc[j]) * p.x_scale[m] * p.w_scale[n];
        p.out[m * p.ldo + n] = float_to_bf16(y + (p.bias ? p.bias[n] : 0.0f));
      }
    }
  }
}

// A plain streaming read (OR of every 64-bit word): the memory-bandwidth meter of the benchmarks. The
// compiler vectorizes it with baseline SSE2, which is far more than DRAM can feed.
extern "C" uint64_t stream_read_portable(const uint64_t* p, int64_t n) {
  uint64_t acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    acc0 |= p[i];
    acc1 |= p[i + 1];
    acc2 |= p[i + 2];
    acc3 |= p[i + 3];
  }
  for (; i < n; ++i) acc0 |= p[i];
  return acc0 | acc1 | acc2 | acc3;
}

extern "C" void densify_bf16_portable(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end,
                                      uint16_t* dense, int64_t ldd, int64_t k) {
  for (int64_t s = strip_begin; s < strip_end; ++s) {
    const int64_t rows = p.n - s * kStrip < kStrip ? p.n - s * kStrip : kStrip;
    for (int64_t j = 0; j < rows; ++j) __builtin_memset(dense + (s * kStrip + j) * ldd, 0, k * 2);
    const uint16_t* v = p.values + p.strip_offsets[s];
    const int32_t* bm = p.bitmaps + s * p.k_tiles * kRowsPerTile;
    for (int64_t t = 0; t < p.k_tiles; ++t) {
      for (int r = 0; r < kRowsPerTile; ++r) {
        uint32_t mask = static_cast<uint32_t>(bm[t * kRowsPerTile + r]);
        const int64_t k0 = t * 32 + 2 * r;
        while (mask) {
          const int c = __builtin_ctz(mask);
          mask &= mask - 1;
          const uint16_t value = *v++;
          const int64_t col = k0 + (c & 1);
          if ((c >> 1) < rows && col < k) dense[(s * kStrip + (c >> 1)) * ldd + col] = value;
        }
      }
    }
  }
}
