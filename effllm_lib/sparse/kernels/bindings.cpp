// The torch side of the extension: argument checks, the run-time dispatch (never calls a kernel whose
// instructions the CPU or OS lacks) and the thread split (at::parallel_for over ranges of strips, on
// torch's OpenMP pool, so torch.set_num_threads controls it; _build.py compiles with -fopenmp, without which
// at::parallel_for silently runs on one thread).
//
// Error path: no C++ exception ever leaves this file, and no message goes through an iostream. Every entry
// point returns a std::string, empty on success, else the reason; sparse_linear.py raises it as a Python
// error. On the device machine (torch 2.11 wheel, extension built there by g++ 13) formatting an integer with
// std::ostream inside the extension (c10::str, which TORCH_CHECK also uses) segfaults, measured case by case:
// messages made only of strings and dtype names came back, every message with an int64 in it crashed. So
// messages are built by eff_msg (eff_msg.h: std::string + std::to_string), and kernels never throw.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <vector>
#include <string>
#include <type_traits>

#include "sparse_kernels.h"

#include "eff_msg.h"

namespace {

const CpuInfo& cpu() {
  static const CpuInfo info = effllm_cpu_probe();
  return info;
}

bool has_avx512_bf16_kernel() {
  const CpuInfo& c = cpu();
  return c.os_avx512 && c.avx512f && c.avx512bw && c.avx512vl && c.avx512_bf16 && c.avx512_vbmi2;
}

bool has_amx_bf16_kernel() {
  const CpuInfo& c = cpu();
  return has_avx512_bf16_kernel() && c.amx_tile && c.amx_bf16 && c.os_amx && c.amx_permission;
}

bool has_amx_int8_kernel() { return has_amx_bf16_kernel() && cpu().amx_int8; }

std::string check_2d(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  EFF_CHECK(t.defined() && t.device().is_cpu(), name, " must be a CPU tensor");
  EFF_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
            t.scalar_type());
  EFF_CHECK(t.dim() == 2 && t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)), name,
            " must be 2-D with contiguous rows");
  return {};
}

std::string check_vec(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t min_numel) {
  EFF_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  EFF_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
            t.scalar_type());
  EFF_CHECK(t.numel() >= min_numel, name, " has ", t.numel(), " elements, needs at least ", min_numel);
  return {};
}

// Shared checks of the compressed weight: shapes and dtypes first, then strip_offsets (read only once
// they are known to be int64 with strips + 1 elements): starting at 0, non-decreasing, and values holding
// the last offset plus the slack a full-vector load at the end may touch.
std::string check_weight(const torch::Tensor& bitmaps, torch::ScalarType bitmap_dtype, const torch::Tensor& values,
                         torch::ScalarType value_dtype, const torch::Tensor& offsets, int64_t n, int64_t slack) {
  EFF_CHECK(bitmaps.defined() && bitmaps.device().is_cpu() && bitmaps.dim() == 3 && bitmaps.size(2) == 16 &&
                bitmaps.is_contiguous(),
            "bitmaps must be a contiguous CPU tensor [strips, k_tiles, 16]");
  EFF_CHECK(bitmaps.scalar_type() == bitmap_dtype, "bitmaps must be ", bitmap_dtype);
  const int64_t strips = bitmaps.size(0);
  EFF_CHECK(n > 0 && (n + 15) / 16 == strips, "out_features ", n, " does not match ", strips, " strips");
  EFF_TRY(check_vec(offsets, "strip_offsets", torch::kInt64, strips + 1));
  const int64_t* off = offsets.data_ptr<int64_t>();
  EFF_CHECK(off[0] == 0, "strip_offsets must start at 0, got ", off[0]);
  for (int64_t s = 0; s < strips; ++s)
    EFF_CHECK(off[s + 1] >= off[s], "strip_offsets must be non-decreasing (strip ", s, ")");
  EFF_TRY(check_vec(values, "values", value_dtype, off[strips] + slack));
  return {};
}

void run_ranges(int64_t strips, int64_t step, const std::function<void(int64_t, int64_t)>& fn) {
  // AMX kernels block two strips at a time: split on even strip indices so no pair is cut.
  const int64_t units = (strips + step - 1) / step;
  at::parallel_for(0, units, 1, [&](int64_t b, int64_t e) {
    fn(b * step, std::min(e * step, strips));
  });
}

// One contiguous range of strips per thread, cut where the bytes to read (2 per nonzero + 64 of bitmaps per
// tile) are split evenly: at 50 % average sparsity single strips still range from far sparser to far denser
// (Wanda prunes per row, magnitude per layer), and an equal strip count leaves threads idle at the end.
void balanced_ranges(const int64_t* off, int64_t strips, int64_t k_tiles, int64_t step,
                     const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t units = (strips + step - 1) / step;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), units);
  if (parts <= 1) {
    fn(0, strips);
    return;
  }
  auto cost = [&](int64_t unit) {  // bytes before strip unit * step
    const int64_t s = std::min(unit * step, strips);
    return off[s] * 2 + s * k_tiles * 64;
  };
  const int64_t total = cost(units);
  auto boundary = [&](int64_t i) -> int64_t {  // first unit whose start cost reaches total * i / parts
    if (i <= 0) return 0;
    if (i >= parts) return units;
    const int64_t target = total / parts * i + (total % parts) * i / parts;
    int64_t lo = 0, hi = units;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cost(mid) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t u0 = boundary(i), u1 = boundary(i + 1);
      if (u0 < u1) fn(u0 * step, std::min(u1 * step, strips));
    }
  });
}

// Kernel codes of the ops: 0 portable, 1 avx512, 2 amx.
void run_bf16(const Bf16Problem& p, int64_t strips, int64_t code) {
  if (code == 0) {
    balanced_ranges(p.strip_offsets, strips, p.k_tiles, 1, [&](int64_t b, int64_t e) { spmm_bf16_portable(p, b, e); });
  } else if (code == 1) {
    balanced_ranges(p.strip_offsets, strips, p.k_tiles, 1, [&](int64_t b, int64_t e) { spmm_bf16_avx512(p, b, e); });
  } else {
    balanced_ranges(p.strip_offsets, strips, p.k_tiles, 2, [&](int64_t b, int64_t e) { spmm_bf16_amx(p, b, e); });
  }
}

std::string spmm_bf16(const torch::Tensor& x, const torch::Tensor& bitmaps, const torch::Tensor& values,
                      const torch::Tensor& strip_offsets, int64_t n, const c10::optional<torch::Tensor>& bias,
                      torch::Tensor& out, const std::string& kernel) {
  EFF_CHECK(kernel == "portable" || kernel == "avx512" || kernel == "amx", "unknown kernel '", kernel,
            "' (expected portable, avx512 or amx)");
  EFF_CHECK(kernel != "avx512" || has_avx512_bf16_kernel(), "kernel 'avx512' needs AVX512F/BW/VL, AVX512_BF16 "
            "and AVX512_VBMI2 enabled by the OS; this CPU lacks one of them (see effllm_lib.sparse.cpu_features())");
  EFF_CHECK(kernel != "amx" || has_amx_bf16_kernel(), "kernel 'amx' needs AMX-BF16 with OS tile support and the "
            "arch_prctl permission; this CPU/OS has none (see effllm_lib.sparse.cpu_features())");
  EFF_TRY(check_weight(bitmaps, torch::kInt32, values, torch::kBFloat16, strip_offsets, n, 32));
  EFF_TRY(check_2d(x, "x", torch::kBFloat16));
  EFF_TRY(check_2d(out, "out", torch::kBFloat16));
  const int64_t strips = bitmaps.size(0), m = out.size(0), k_tiles = bitmaps.size(1);
  EFF_CHECK(out.size(1) == n, "out must have ", n, " columns, got ", out.size(1));
  EFF_CHECK(x.size(1) >= k_tiles * 32, "x needs ", k_tiles * 32, " columns (in_features padded to 32), got ",
            x.size(1));
  const int64_t rows_needed = (kernel == "amx" && m > 16) ? (m + 15) / 16 * 16 : m;
  EFF_CHECK(x.size(0) >= rows_needed, "x has ", x.size(0), " rows, the ", kernel, " kernel needs ", rows_needed);
  if (bias) EFF_TRY(check_vec(*bias, "bias", torch::kFloat32, n));
  if (m == 0) return {};
  Bf16Problem p{reinterpret_cast<const uint16_t*>(x.data_ptr()), m, x.stride(0), bitmaps.data_ptr<int32_t>(),
                reinterpret_cast<const uint16_t*>(values.data_ptr()), strip_offsets.data_ptr<int64_t>(), nullptr,
                k_tiles, n, bias ? bias->data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(out.data_ptr()),
                out.stride(0)};
  run_bf16(p, strips, kernel == "portable" ? 0 : kernel == "avx512" ? 1 : 2);
  return {};
}

std::string dense_bf16_amx_op(const torch::Tensor& x, const torch::Tensor& dense, int64_t n,
                              const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  EFF_CHECK(has_amx_bf16_kernel(), "the dense AMX kernel needs AMX-BF16 with OS tile support and the "
            "arch_prctl permission; this CPU/OS has none");
  EFF_CHECK(dense.defined() && dense.device().is_cpu() && dense.dim() == 4 && dense.size(2) == 16 &&
                dense.size(3) == 32 && dense.is_contiguous() && dense.scalar_type() == torch::kBFloat16,
            "dense must be contiguous bf16 [strips, k_tiles, 16, 32] (pack_dense_bf16_vnni)");
  EFF_TRY(check_2d(x, "x", torch::kBFloat16));
  EFF_TRY(check_2d(out, "out", torch::kBFloat16));
  const int64_t m = out.size(0), strips = dense.size(0), k_tiles = dense.size(1);
  EFF_CHECK(out.size(1) == n && (n + 15) / 16 == strips, "out/n do not match the packed weight");
  EFF_CHECK(x.size(1) >= k_tiles * 32 && x.size(0) >= (m > 16 ? (m + 15) / 16 * 16 : m),
            "x must be padded to [round_up(m, 16), k_tiles * 32]");
  if (bias) EFF_TRY(check_vec(*bias, "bias", torch::kFloat32, n));
  if (m == 0) return {};
  Bf16Problem p{reinterpret_cast<const uint16_t*>(x.data_ptr()), m, x.stride(0), nullptr, nullptr, nullptr,
                reinterpret_cast<const uint16_t*>(dense.data_ptr()), k_tiles, n,
                bias ? bias->data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(out.data_ptr()), out.stride(0)};
  run_ranges(strips, 2, [&](int64_t b, int64_t e) { dense_bf16_amx(p, b, e); });
  return {};
}

std::string spmm_int8(const torch::Tensor& xq, const torch::Tensor& x_scale, const torch::Tensor& bitmaps,
                      const torch::Tensor& values, const torch::Tensor& strip_offsets, const torch::Tensor& w_scale,
                      int64_t n, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                      const std::string& kernel) {
  EFF_CHECK(kernel == "portable" || kernel == "amx", "unknown int8 kernel '", kernel,
            "' (expected portable or amx)");
  EFF_CHECK(kernel != "amx" || has_amx_int8_kernel(), "kernel 'amx' (int8) needs AMX-INT8 with OS tile support "
            "and the arch_prctl permission; this CPU/OS has none (see effllm_lib.sparse.cpu_features())");
  EFF_TRY(check_weight(bitmaps, torch::kInt64, values, torch::kInt8, strip_offsets, n, 64));
  EFF_TRY(check_2d(xq, "xq", torch::kChar));
  EFF_TRY(check_2d(out, "out", torch::kBFloat16));
  const int64_t strips = bitmaps.size(0), m = out.size(0), k_tiles = bitmaps.size(1);
  EFF_CHECK(out.size(1) == n, "out must have ", n, " columns, got ", out.size(1));
  EFF_CHECK(xq.size(1) >= k_tiles * 64, "xq needs ", k_tiles * 64, " columns (in_features padded to 64)");
  const int64_t rows_needed = (kernel == "amx" && m > 16) ? (m + 15) / 16 * 16 : m;
  EFF_CHECK(xq.size(0) >= rows_needed, "xq has ", xq.size(0), " rows, needs ", rows_needed);
  EFF_TRY(check_vec(x_scale, "x_scale", torch::kFloat32, m));
  EFF_TRY(check_vec(w_scale, "w_scale", torch::kFloat32, n));
  if (bias) EFF_TRY(check_vec(*bias, "bias", torch::kFloat32, n));
  if (m == 0) return {};
  Int8Problem p{xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(), m, xq.stride(0), bitmaps.data_ptr<int64_t>(),
                values.data_ptr<int8_t>(), strip_offsets.data_ptr<int64_t>(), w_scale.data_ptr<float>(), k_tiles, n,
                bias ? bias->data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(out.data_ptr()), out.stride(0)};
  if (kernel == "portable") {
    run_ranges(strips, 1, [&](int64_t b, int64_t e) { spmm_int8_portable(p, b, e); });
  } else {
    run_ranges(strips, 2, [&](int64_t b, int64_t e) { spmm_int8_amx(p, b, e); });
  }
  return {};
}

// The memory-bandwidth meter: every thread of torch's pool streams its own contiguous chunk of t once
// (an OR of every 64-bit word, so the loads cannot be dropped). Returns {error, OR of the words, threads used}.
// method "avx512": four 64-byte load streams per thread (needs AVX-512; the chunk grain keeps them aligned).
py::tuple stream_read(const torch::Tensor& t, const std::string& method) {
  if (!(t.defined() && t.device().is_cpu() && t.is_contiguous() && t.nbytes() % 8 == 0))
    return py::make_tuple(std::string("stream_read needs a contiguous CPU tensor whose size is a multiple of 8 bytes"),
                          0, 0);
  if (method != "portable" && method != "avx512")
    return py::make_tuple(std::string("stream_read: method must be 'portable' or 'avx512'"), 0, 0);
  if (method == "avx512" && !has_avx512_bf16_kernel())
    return py::make_tuple(std::string("stream_read: method 'avx512' needs AVX-512 on this CPU"), 0, 0);
  const bool wide = method == "avx512";
  const auto* p = reinterpret_cast<const uint64_t*>(t.data_ptr());
  const int64_t words = static_cast<int64_t>(t.nbytes() / 8);
  std::atomic<uint64_t> acc{0};
  std::atomic<int64_t> width{0};
  {
    py::gil_scoped_release no_gil;
    at::parallel_for(0, words, 1 << 16, [&](int64_t b, int64_t e) {
      acc |= wide ? stream_read_avx512(p + b, e - b) : stream_read_portable(p + b, e - b);
      const int64_t mine = at::get_thread_num() + 1;
      int64_t seen = width.load();
      while (mine > seen && !width.compare_exchange_weak(seen, mine)) {
      }
    });
  }
  return py::make_tuple(std::string(), static_cast<int64_t>(acc.load()), width.load());
}

py::dict cpu_probe() {
  const CpuInfo& c = cpu();
  py::dict d;
  d["avx512f"] = c.avx512f;
  d["avx512bw"] = c.avx512bw;
  d["avx512vl"] = c.avx512vl;
  d["avx512_bf16"] = c.avx512_bf16;
  d["avx512_vbmi2"] = c.avx512_vbmi2;
  d["avx512_vpopcntdq"] = c.avx512_vpopcntdq;
  d["avx512_vnni"] = c.avx512_vnni;
  d["amx_tile"] = c.amx_tile;
  d["amx_bf16"] = c.amx_bf16;
  d["amx_int8"] = c.amx_int8;
  d["os_avx512"] = c.os_avx512;
  d["os_amx"] = c.os_amx;
  d["amx_permission"] = c.amx_permission;
  d["kernel_avx512"] = has_avx512_bf16_kernel();
  d["kernel_amx_bf16"] = has_amx_bf16_kernel();
  d["kernel_amx_int8"] = has_amx_int8_kernel();
  const CpuInfoX86 x = effllm_cpu_probe_avx2();
  d["avx2"] = x.avx2;
  d["fma"] = x.fma;
  d["os_avx"] = x.os_avx;
  return d;
}

// ------------------------------------------------------------------------------------------- the ops
// torch.library ops (namespace effllm_sparse) for the model path: one dispatcher call per linear, shape
// and dtype checks only (O(1)); the weight itself (offsets monotonic, values long enough) was validated once
// when it was packed or loaded (sparse_linear.validate_packed). Errors are raised with TORCH_CHECK on a
// message built by eff_msg (strings only through the ostream, which is what works on the device build).
const char* kernel_refusal(int64_t code) {
  if (code == 1 && !has_avx512_bf16_kernel()) return "kernel avx512 cannot run on this CPU";
  if (code == 2 && !has_amx_bf16_kernel()) return "kernel amx cannot run on this CPU/OS";
  if (code < 0 || code > 2) return "kernel code must be 0 (portable), 1 (avx512) or 2 (amx)";
  return nullptr;
}

std::string op_weight_checks(const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets,
                             int64_t n) {
  EFF_CHECK(bitmaps.dim() == 3 && bitmaps.size(2) == 16 && bitmaps.scalar_type() == at::kInt &&
                bitmaps.is_contiguous() && bitmaps.device().is_cpu(),
            "bitmaps must be contiguous int32 [strips, k_tiles, 16] on the CPU");
  EFF_CHECK(values.scalar_type() == at::kBFloat16 && values.is_contiguous() && values.dim() == 1,
            "values must be a contiguous 1-D bf16 tensor");
  EFF_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == bitmaps.size(0) + 1,
            "strip_offsets must be contiguous int64 [strips + 1]");
  EFF_CHECK(n > 0 && (n + 15) / 16 == bitmaps.size(0), "out_features ", n, " does not match ", bitmaps.size(0),
            " strips");
  return {};
}

// x [..., K] (any float dtype) -> contiguous bf16 [rows, k_tiles * 32] with rows >= m (AMX pads tokens to 16).
at::Tensor op_input(const at::Tensor& x, int64_t k_tiles, int64_t code, int64_t& m) {
  const int64_t K = x.size(-1);
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.scalar_type() != at::kBFloat16) x2 = x2.to(at::kBFloat16);
  m = x2.size(0);
  const int64_t rows = (code == 2 && m > 16) ? (m + 15) / 16 * 16 : m;
  if (K == k_tiles * 32 && rows == m && x2.stride(1) == 1 && (m <= 1 || x2.stride(0) >= K)) return x2;
  at::Tensor xp = at::zeros({rows, k_tiles * 32}, x2.options());
  xp.narrow(0, 0, m).narrow(1, 0, K).copy_(x2);
  return xp;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

at::Tensor op_spmm_bf16(const at::Tensor& x, const at::Tensor& bitmaps, const at::Tensor& values,
                        const at::Tensor& offsets, int64_t n, const c10::optional<at::Tensor>& bias, int64_t code) {
  const char* refusal = kernel_refusal(code);
  TORCH_CHECK(refusal == nullptr, std::string(refusal));
  std::string err = op_weight_checks(bitmaps, values, offsets, n);
  const int64_t k_tiles = bitmaps.size(1);
  if (err.empty() && !(x.dim() >= 1 && x.device().is_cpu() && x.size(-1) > (k_tiles - 1) * 32 &&
                       x.size(-1) <= k_tiles * 32))
    err = eff_msg("x must be a CPU tensor [..., in_features] with in_features in (", (k_tiles - 1) * 32, ", ",
                  k_tiles * 32, "]");
  if (err.empty() && bias && !(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n))
    err = eff_msg("bias must be contiguous float32 [", n, "]");
  TORCH_CHECK(err.empty(), err);
  int64_t m = 0;
  const at::Tensor xb = op_input(x, k_tiles, code, m);
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kBFloat16));
  if (m > 0) {
    Bf16Problem p{reinterpret_cast<const uint16_t*>(xb.data_ptr()), m, xb.stride(0), bitmaps.data_ptr<int32_t>(),
                  reinterpret_cast<const uint16_t*>(values.data_ptr()), offsets.data_ptr<int64_t>(), nullptr, k_tiles,
                  n, bias ? bias->data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(out.data_ptr()), n};
    run_bf16(p, bitmaps.size(0), code);
  }
  return out.view(out_shape(x, n));
}

inline float act_value(float g, int64_t act) {
  if (act == 0) return g / (1.0f + std::exp(-g));  // SiLU
  // GELU, tanh approximation (Gemma's gelu_pytorch_tanh)
  const float c = 0.7978845608028654f;
  return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
}

// act(gate) * up with gate and up packed as one weight whose strips alternate: strip 2j = gate rows
// 16j..16j+15, strip 2j+1 = up rows 16j..16j+15 (pack order of sparse_linear.interleave_gate_up). Each
// thread computes its pairs of strips into a small buffer and writes act(g) * u from it: no [m, 2I]
// intermediate in memory and one call instead of gate, up, act and mul.
at::Tensor op_spmm_bf16_act_mul(const at::Tensor& x, const at::Tensor& bitmaps, const at::Tensor& values,
                                const at::Tensor& offsets, int64_t n_out, int64_t code, int64_t act) {
  const char* refusal = kernel_refusal(code);
  TORCH_CHECK(refusal == nullptr, std::string(refusal));
  std::string err = (n_out > 0 && n_out % 16 == 0) ? op_weight_checks(bitmaps, values, offsets, 2 * n_out)
                                                  : eff_msg("n_out must be a positive multiple of 16, got ", n_out);
  const int64_t k_tiles = err.empty() ? bitmaps.size(1) : 0;
  if (err.empty() && !(x.dim() >= 1 && x.device().is_cpu() && x.size(-1) > (k_tiles - 1) * 32 &&
                       x.size(-1) <= k_tiles * 32))
    err = eff_msg("x must be a CPU tensor [..., in_features] with in_features in (", (k_tiles - 1) * 32, ", ",
                  k_tiles * 32, "]");
  if (err.empty() && act != 0 && act != 1) err = "act must be 0 (silu) or 1 (gelu_tanh)";
  TORCH_CHECK(err.empty(), err);
  int64_t m = 0;
  const at::Tensor xb = op_input(x, k_tiles, code, m);
  at::Tensor out = at::empty({m, n_out}, x.options().dtype(at::kBFloat16));
  const int64_t strips = bitmaps.size(0);
  if (m > 0) {
    Bf16Problem base{reinterpret_cast<const uint16_t*>(xb.data_ptr()), m, xb.stride(0), bitmaps.data_ptr<int32_t>(),
                     reinterpret_cast<const uint16_t*>(values.data_ptr()), offsets.data_ptr<int64_t>(), nullptr,
                     k_tiles, 2 * n_out, nullptr, nullptr, 0};
    uint16_t* y = reinterpret_cast<uint16_t*>(out.data_ptr());
    balanced_ranges(base.strip_offsets, strips, k_tiles, 2, [&](int64_t b, int64_t e) {
      const int64_t width = (e - b) * 16;
      std::vector<uint16_t> buf(static_cast<size_t>(m * width));
      Bf16Problem p = base;
      p.out = buf.data() - b * 16;  // the kernels write column 16 s + j of row i at out[i * ldo + 16 s + j]
      p.ldo = width;
      if (code == 0) spmm_bf16_portable(p, b, e);
      else if (code == 1) spmm_bf16_avx512(p, b, e);
      else spmm_bf16_amx(p, b, e);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t s = b; s < e; s += 2)
          for (int j = 0; j < 16; ++j) {
            const float g = bf16_to_float(buf[i * width + (s - b) * 16 + j]);
            const float u = bf16_to_float(buf[i * width + (s + 1 - b) * 16 + j]);
            y[i * n_out + (s / 2) * 16 + j] = float_to_bf16(act_value(g, act) * u);
          }
    });
  }
  return out.view(out_shape(x, n_out));
}

// The dense bf16 weight [n, k] back from the tile format, on all threads: the prefill path multiplies many
// tokens with a dense GEMM, where decompressing once beats decompressing once per 1-32 tokens.
at::Tensor op_densify_bf16(const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets,
                           int64_t n, int64_t k) {
  std::string err = op_weight_checks(bitmaps, values, offsets, n);
  if (err.empty() && !(k > (bitmaps.size(1) - 1) * 32 && k <= bitmaps.size(1) * 32))
    err = eff_msg("in_features ", k, " does not match ", bitmaps.size(1), " k-tiles");
  TORCH_CHECK(err.empty(), err);
  at::Tensor dense = at::empty({n, k}, values.options());
  Bf16Problem p{nullptr, 0, 0, bitmaps.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(values.data_ptr()),
                offsets.data_ptr<int64_t>(), nullptr, bitmaps.size(1), n, nullptr, nullptr, 0};
  uint16_t* d = reinterpret_cast<uint16_t*>(dense.data_ptr());
  const bool wide = has_avx512_bf16_kernel() && k % 2 == 0;
  balanced_ranges(p.strip_offsets, bitmaps.size(0), p.k_tiles, 1, [&](int64_t b, int64_t e) {
    if (wide) densify_bf16_avx512(p, b, e, d, k, k);
    else densify_bf16_portable(p, b, e, d, k, k);
  });
  return dense;
}

// Seconds per call of a bf16 kernel timed inside C++ (no Python, no dispatcher): `one_thread` runs every
// strip on the calling thread (the per-thread decode rate), else the threaded split of the ops.
py::tuple spmm_bf16_timed(const torch::Tensor& x, const torch::Tensor& bitmaps, const torch::Tensor& values,
                          const torch::Tensor& strip_offsets, int64_t n, int64_t code, int64_t iters,
                          bool one_thread) {
  const char* refusal = kernel_refusal(code);
  if (refusal) return py::make_tuple(std::string(refusal), 0.0);
  std::string err = op_weight_checks(bitmaps, values, strip_offsets, n);
  if (err.empty() && iters < 1) err = "iters must be >= 1";
  if (err.empty()) err = check_weight(bitmaps, torch::kInt32, values, torch::kBFloat16, strip_offsets, n, 32);
  if (err.empty()) err = check_2d(x, "x", torch::kBFloat16);
  const int64_t k_tiles = bitmaps.size(1);
  if (err.empty() && x.size(1) != k_tiles * 32) err = eff_msg("x needs ", k_tiles * 32, " columns");
  if (err.empty() && code == 2 && x.size(0) > 16 && x.size(0) % 16)
    err = "the amx kernel needs tokens padded to a multiple of 16 beyond 16";
  if (!err.empty()) return py::make_tuple(err, 0.0);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  Bf16Problem p{reinterpret_cast<const uint16_t*>(x.data_ptr()), x.size(0), x.stride(0), bitmaps.data_ptr<int32_t>(),
                reinterpret_cast<const uint16_t*>(values.data_ptr()), strip_offsets.data_ptr<int64_t>(), nullptr,
                k_tiles, n, nullptr, reinterpret_cast<uint16_t*>(out.data_ptr()), n};
  const int64_t strips = bitmaps.size(0);
  double seconds = 0;
  {
    py::gil_scoped_release no_gil;
    auto once = [&]() {
      if (!one_thread) return run_bf16(p, strips, code);
      if (code == 0) spmm_bf16_portable(p, 0, strips);
      else if (code == 1) spmm_bf16_avx512(p, 0, strips);
      else spmm_bf16_amx(p, 0, strips);
    };
    once();  // warm-up
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) once();
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  }
  return py::make_tuple(std::string(), seconds);
}


// The compressed format from a dense bf16 weight [n, k] (contiguous), on all threads: a count pass per strip,
// the prefix sum, then a write pass. The torch-op version in format.py (pack_bf16) is the reference; this one
// is what makes packing an 8B model take seconds instead of minutes. Bit c of row r of tile (s, t) is
// W[16 s + c / 2, 32 t + 2 r + c % 2] != 0.
py::tuple pack_bf16_fast(const torch::Tensor& w) {
  if (!(w.defined() && w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 &&
        w.size(0) > 0 && w.size(1) > 0))
    return py::make_tuple(std::string("pack_bf16_fast needs a contiguous, non-empty 2-D bf16 CPU tensor"), py::none(),
                          py::none(), py::none());
  const int64_t n = w.size(0), k = w.size(1), strips = (n + 15) / 16, k_tiles = (k + 31) / 32;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  at::Tensor bitmaps = at::empty({strips, k_tiles, 16}, at::kInt);
  at::Tensor counts = at::zeros({strips + 1}, at::kLong);
  int32_t* bm = bitmaps.data_ptr<int32_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  {
    py::gil_scoped_release no_gil;
    at::parallel_for(0, strips, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        int64_t total = 0;
        for (int64_t t = 0; t < k_tiles; ++t)
          for (int r = 0; r < 16; ++r) {
            uint32_t mask = 0;
            for (int c = 0; c < 32; ++c) {
              const int64_t row = s * 16 + c / 2, col = t * 32 + 2 * r + c % 2;
              if (row < n && col < k && (src[row * k + col] & 0x7fff) != 0) mask |= 1u << c;
            }
            bm[(s * k_tiles + t) * 16 + r] = static_cast<int32_t>(mask);
            total += __builtin_popcount(mask);
          }
        cnt[s + 1] = total;
      }
    });
  }
  at::Tensor offsets = counts.cumsum(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  at::Tensor values = at::zeros({off[strips] + 32}, at::kBFloat16);
  uint16_t* dst = reinterpret_cast<uint16_t*>(values.data_ptr());
  {
    py::gil_scoped_release no_gil;
    at::parallel_for(0, strips, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        uint16_t* v = dst + off[s];
        for (int64_t t = 0; t < k_tiles; ++t)
          for (int r = 0; r < 16; ++r) {
            uint32_t mask = static_cast<uint32_t>(bm[(s * k_tiles + t) * 16 + r]);
            while (mask) {
              const int c = __builtin_ctz(mask);
              mask &= mask - 1;
              *v++ = src[(s * 16 + c / 2) * k + t * 32 + 2 * r + c % 2];
            }
          }
      }
    });
  }
  return py::make_tuple(std::string(), bitmaps, values, offsets);
}

}  // namespace

TORCH_LIBRARY(effllm_sparse, m) {
  m.def("spmm_bf16(Tensor x, Tensor bitmaps, Tensor values, Tensor strip_offsets, int n, Tensor? bias, int kernel) "
        "-> Tensor");
  m.def("spmm_bf16_act_mul(Tensor x, Tensor bitmaps, Tensor values, Tensor strip_offsets, int n_out, int kernel, "
        "int act) -> Tensor");
  m.def("densify_bf16(Tensor bitmaps, Tensor values, Tensor strip_offsets, int n, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(effllm_sparse, CPU, m) {
  m.impl("spmm_bf16", &op_spmm_bf16);
  m.impl("spmm_bf16_act_mul", &op_spmm_bf16_act_mul);
  m.impl("densify_bf16", &op_densify_bf16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effllm SparAMX sparse-weight CPU kernels";
  m.def("cpu_probe", &cpu_probe, "cpuid + xgetbv + arch_prctl: what the kernels may use here");
  m.def("spmm_bf16", &spmm_bf16, "out = x @ W^T + bias with W in the compressed bf16 format");
  m.def("spmm_int8", &spmm_int8, "out = (xq * x_scale) @ (W * w_scale)^T + bias, compressed int8 W");
  m.def("stream_read", &stream_read, "read a tensor once (memory-bandwidth meter)", py::arg("t"),
        py::arg("method") = "portable");
  m.def("pack_bf16_fast", &pack_bf16_fast, "the compressed bf16 format from a dense bf16 weight, multi-threaded");
  m.def("spmm_bf16_timed", &spmm_bf16_timed, "seconds per call of a bf16 kernel, timed in a C++ loop");
  m.def("dense_bf16_amx", &dense_bf16_amx_op, "dense AMX bf16 baseline on VNNI-packed tiles");
}
