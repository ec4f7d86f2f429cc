// Plain-C interface of the sparse kernels. Each instruction set lives in its own translation unit that
// includes no torch header (an inline torch function compiled there with AVX-512 or AMX enabled could be
// picked by the linker for the whole extension and then run on a CPU without it). bindings.cpp holds all
// torch code, checks the arguments and dispatches only to what cpu_probe() found.
//
// Every kernel computes out[m, n] = bf16(sum_k x[m, k] W[n, k] + bias[n]) for the strips [strip_begin,
// strip_end) of the weight (16 output columns each), so at::parallel_for can hand each thread a range.
#pragma once
#include <cstdint>

struct Bf16Problem {
  const uint16_t* x;      // bf16 [m_rows, ldx]; columns >= k_tiles * 32 are never read
  int64_t m;              // tokens
  int64_t ldx;            // elements between rows of x (>= k_tiles * 32)
  const int32_t* bitmaps; // [strips, k_tiles, 16]
  const uint16_t* values; // packed bf16 nonzeros (+ 64 bytes slack)
  const int64_t* strip_offsets;
  const uint16_t* dense;  // dense VNNI tiles [strips, k_tiles, 16, 32] (dense kernels only)
  int64_t k_tiles;        // K padded / 32
  int64_t n;              // real out_features (columns >= n are not written)
  const float* bias;      // [n] or null
  uint16_t* out;          // bf16 [m, ldo]
  int64_t ldo;
};

struct Int8Problem {
  const int8_t* x;        // int8 [m_rows, ldx] (per-token quantized activations)
  const float* x_scale;   // [m]
  int64_t m;
  int64_t ldx;            // >= k_tiles * 64
  const int64_t* bitmaps; // [strips, k_tiles, 16]
  const int8_t* values;
  const int64_t* strip_offsets;
  const float* w_scale;   // [n]
  int64_t k_tiles;        // K padded / 64
  int64_t n;
  const float* bias;
  uint16_t* out;          // bf16 [m, ldo]
  int64_t ldo;
};

struct CpuInfo {
  bool avx512f, avx512bw, avx512vl, avx512_bf16, avx512_vbmi2, avx512_vpopcntdq, avx512_vnni;
  bool amx_tile, amx_bf16, amx_int8;
  bool os_avx512;   // XCR0 enables opmask + ZMM state
  bool os_amx;      // XCR0 enables XTILECFG + XTILEDATA
  bool amx_permission;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeded
};

extern "C" {
CpuInfo effllm_cpu_probe();
bool effllm_request_amx();

void spmm_bf16_portable(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end);
void spmm_int8_portable(const Int8Problem& p, int64_t strip_begin, int64_t strip_end);
uint64_t stream_read_portable(const uint64_t* p, int64_t n);

void spmm_bf16_avx512(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end);
// Four independent 64-byte load streams over [p, p + n) (n 64-bit words): the AVX-512 bandwidth meter.
uint64_t stream_read_avx512(const uint64_t* p, int64_t n);

// Expand strips [strip_begin, strip_end) of a compressed bf16 weight into a dense row-major bf16 matrix
// dense[out, ldd] (columns k_tiles * 32, rows < n only): the prefill path's weight for a dense GEMM.
void densify_bf16_portable(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end, uint16_t* dense,
                           int64_t ldd, int64_t k);
void densify_bf16_avx512(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end, uint16_t* dense,
                         int64_t ldd, int64_t k);

// AMX kernels need m_rows padded: x has round_up(m, 16) readable rows when m > 16.
void spmm_bf16_amx(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end);
void dense_bf16_amx(const Bf16Problem& p, int64_t strip_begin, int64_t strip_end);
void spmm_int8_amx(const Int8Problem& p, int64_t strip_begin, int64_t strip_end);
}

// bf16 <-> float without any vector instruction (round to nearest even, NaN kept quiet).
static inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ------------------------------------------------------------------------------ sparse KV-cache attention
// out[i, 16 (s - strip_base) + j] = sum_k x[i, k] W[16 s + j, k] for the strips [strip_begin, strip_end) of a
// compressed bf16 matrix W, with x and out in float32 and float32 accumulation (every bf16 value widened
// exactly): the QK^T (W = K of one head, rows = positions) and PV (W = V^T, rows = head dims) products of
// decode attention. All 16 columns of a strip are written (callers size out to whole strips).
struct F32Problem {
  const float* x;          // [m, ldx]; columns k_tiles * 32 are read, zero beyond the real K
  int64_t m;               // rows of x (the query heads sharing one KV head)
  int64_t ldx;
  const int32_t* bitmaps;  // [strips, k_tiles, 16]; null: dense layout (all values, tile order, no offsets)
  const uint16_t* values;  // packed bf16 nonzeros (+ 64 bytes slack), or [strips, k_tiles, 16, 32] if dense
  const int64_t* strip_offsets;
  int64_t k_tiles;
  int64_t strip_base;      // the strip written to column 0 of out
  float* out;              // [m, ldo]
  int64_t ldo;
};

struct CpuInfoX86 {
  bool avx2, fma, os_avx;  // AVX2 + FMA with YMM state enabled by the OS
};

extern "C" {
CpuInfoX86 effllm_cpu_probe_avx2();
void spmv_f32_portable(const F32Problem& p, int64_t strip_begin, int64_t strip_end);
void spmv_f32_avx2(const F32Problem& p, int64_t strip_begin, int64_t strip_end);
void spmv_f32_avx512(const F32Problem& p, int64_t strip_begin, int64_t strip_end);
}
