// The torch side of the BitMoD GEMV extension: argument checks, run-time dispatch (a kernel runs only where
// the CPU and OS support its instructions) and the thread split (at::parallel_for over output rows on torch's
// OpenMP pool, so torch.set_num_threads controls it). Errors come back as a string, empty on success, never
// as a C++ exception and never formatted through iostreams (see effllm_lib/sparse/kernels/bindings.cpp for
// the crash on the device machine that rule avoids).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>

#include "bitmod_kernels.h"

namespace {

// libgcc's probe reads cpuid and, for AVX/AVX-512, also XCR0 (the register state the OS saves), so "avx512f"
// is only reported where zmm registers survive a context switch. Called from this file, which is compiled
// without any target flag.
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f");
}

std::string num(int64_t v) { return std::to_string(v); }

std::string gemv(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                 const torch::Tensor& types, const torch::Tensor& table, int64_t bits, int64_t gp,
                 int64_t round_mode, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                 const std::string& kernel) {
  if (kernel != "portable" && kernel != "avx2" && kernel != "avx512")
    return "unknown kernel '" + kernel + "' (expected portable, avx2 or avx512)";
  if (kernel == "avx2" && !has_avx2())
    return "kernel 'avx2' needs AVX2, FMA and F16C; this CPU lacks one of them (use 'portable')";
  if (kernel == "avx512" && !has_avx512())
    return "kernel 'avx512' needs AVX512F (with zmm state enabled by the OS), AVX2, FMA and F16C; this CPU/OS "
           "lacks one of them (use 'avx2' or 'portable')";
  if (bits != 3 && bits != 4) return "bits must be 3 or 4, got " + num(bits);
  if (gp <= 0 || gp % 8) return "the padded group size must be a positive multiple of 8, got " + num(gp);
  if (kernel != "portable" && gp % 64)
    return "the " + kernel + " kernel needs the padded group size to be a multiple of 64, got " + num(gp) +
           " (use 'portable')";
  if (round_mode < 0 || round_mode > 2) return "round_mode must be 0 (fp32), 1 (bf16) or 2 (fp16)";
  auto cpu_contig = [](const torch::Tensor& t) { return t.defined() && t.device().is_cpu() && t.is_contiguous(); };
  if (!cpu_contig(codes) || codes.dim() != 2 || codes.scalar_type() != torch::kByte)
    return "codes must be a contiguous 2-D uint8 CPU tensor";
  if (!cpu_contig(scales) || scales.dim() != 2 ||
      (scales.scalar_type() != torch::kHalf && scales.scalar_type() != torch::kFloat))
    return "scales must be a contiguous 2-D float16 or float32 CPU tensor";
  const int64_t n = codes.size(0), n_groups = scales.size(1), type_stride = (n_groups + 3) / 4;
  if (scales.size(0) != n) return "scales has " + num(scales.size(0)) + " rows, codes " + num(n);
  if (codes.size(1) != n_groups * gp * bits / 8)
    return "codes has " + num(codes.size(1)) + " bytes per row, expected " + num(n_groups * gp * bits / 8);
  if (!cpu_contig(types) || types.scalar_type() != torch::kByte || types.dim() != 2 || types.size(0) != n ||
      types.size(1) != type_stride)
    return "type_ids must be contiguous uint8 [" + num(n) + ", " + num(type_stride) + "]";
  if (!cpu_contig(table) || table.scalar_type() != torch::kFloat || table.numel() != 64)
    return "table must be a contiguous float32 [4, 16] tensor";
  if (!x.defined() || !x.device().is_cpu() || x.scalar_type() != torch::kFloat || x.dim() != 2 || x.stride(1) != 1)
    return "x must be a 2-D float32 CPU tensor with contiguous rows";
  const int64_t m = x.size(0);
  if (m < 1 || m > 8) return "x must have 1 to 8 rows (tokens), got " + num(m);
  if (x.size(1) != n_groups * gp) return "x must have n_groups * gp = " + num(n_groups * gp) + " columns, got " +
                                         num(x.size(1));
  if (!out.defined() || !out.device().is_cpu() || out.scalar_type() != torch::kFloat || out.dim() != 2 ||
      out.stride(1) != 1 || out.size(0) != m || out.size(1) != n)
    return "out must be float32 [" + num(m) + ", " + num(n) + "] with contiguous rows";
  if (bias && (!cpu_contig(*bias) || bias->scalar_type() != torch::kFloat || bias->numel() != n))
    return "bias must be a contiguous float32 CPU tensor of " + num(n) + " elements";
  GemvProblem p{x.data_ptr<float>(), m, x.stride(0), codes.data_ptr<uint8_t>(), scales.data_ptr(),
                scales.scalar_type() == torch::kFloat ? 1 : 0, types.data_ptr<uint8_t>(), type_stride, n_groups, gp,
                static_cast<int>(bits), table.data_ptr<float>(), static_cast<int>(round_mode),
                bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), out.stride(0)};
  auto fn = kernel == "avx512" ? bitmod_gemv_avx512 : kernel == "avx2" ? bitmod_gemv_avx2 : bitmod_gemv_portable;
  {
    py::gil_scoped_release no_gil;
    // grain: about 64 KiB of codes per task, so small layers don't pay for threads they can't use
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, codes.size(1)));
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(p, b, e); });
  }
  return {};
}

py::dict cpu_probe() {
  py::dict d;
  d["avx2"] = has_avx2();
  d["avx512"] = has_avx512();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effllm BitMoD LUT GEMV CPU kernels";
  m.def("cpu_probe", &cpu_probe, "which BitMoD kernels this CPU and OS can run");
  m.def("gemv", &gemv, "out[m, n] = x[m, K] @ dequant(W)^T + bias for the packed BitMoD weight (m <= 8)");
}
