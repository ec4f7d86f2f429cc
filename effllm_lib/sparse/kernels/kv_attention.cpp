// Decode attention over a sparse KV cache (SparAMX's KV sparsity), all heads of a layer in one op call:
//
//   out[i] = softmax(scale * q[i] . [K_h ; K_tail_h]^T) @ [V_h ; V_tail_h]     (h = i / (Hq / Hkv))
//
// K_h [S, D] and V_h^T [D, S] of every KV head are stored in the compressed bf16 tile format (one matrix for
// all heads: K as [Hkv * Sp, D] with each head's S rows padded to Sp = round_up(S, 16), V^T as [Hkv * D, S]),
// the tokens decoded after the pruning in dense tails [Hkv, T, D]. Three parallel passes: QK^T over the
// strips of K (16 positions each), the tail scores and the softmax per query head (float32, max-subtracted),
// then PV over the strips of V^T (16 head dims each) plus the tail. Everything is float32 on bf16 values
// widened exactly, so the result differs from a float64 reference on the same pruned caches only by float32
// rounding. With empty bitmaps the caches are in the dense layout (every value, tile order, no bitmaps): the same
// kernels on an unpruned cache, the dense baseline of the same code. The query heads of a KV head (GQA) are the rows of one strip product: K and V are read once.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "eff_msg.h"
#include "sparse_kernels.h"

namespace {

const CpuInfo& cpu_info() {
  static const CpuInfo info = effllm_cpu_probe();
  return info;
}
const CpuInfoX86& cpu_avx2() {
  static const CpuInfoX86 info = effllm_cpu_probe_avx2();
  return info;
}

bool kv_avx512_ok() {
  const CpuInfo& c = cpu_info();
  return c.os_avx512 && c.avx512f && c.avx512bw && c.avx512vl && c.avx512_vbmi2;
}
bool kv_avx2_ok() {
  const CpuInfoX86& c = cpu_avx2();
  return c.os_avx && c.avx2 && c.fma;
}

// Kernel codes: 0 portable, 1 avx512, 3 avx2 (2 is AMX in the linear ops; there is no AMX KV kernel).
using SpmvFn = void (*)(const F32Problem&, int64_t, int64_t);
std::string kv_kernel(int64_t code, SpmvFn& fn) {
  if (code == 0) { fn = spmv_f32_portable; return {}; }
  if (code == 1) {
    EFF_CHECK(kv_avx512_ok(), "the avx512 KV kernel needs AVX512F/BW/VL + AVX512_VBMI2 with ZMM state enabled "
              "by the OS; this CPU/OS lacks one of them");
    fn = spmv_f32_avx512;
    return {};
  }
  if (code == 3) {
    EFF_CHECK(kv_avx2_ok(), "the avx2 KV kernel needs AVX2 + FMA with YMM state enabled by the OS");
    fn = spmv_f32_avx2;
    return {};
  }
  return eff_msg("KV kernel code must be 0 (portable), 1 (avx512) or 3 (avx2), got ", code);
}

// Empty bitmaps and offsets: the dense layout (every value of the [strips, k_tiles, 16, 32] tiles, no bitmaps).
std::string check_packed(const at::Tensor& bm, const at::Tensor& vals, const at::Tensor& off, int64_t strips,
                         int64_t k_tiles, const char* name) {
  if (bm.numel() == 0) {
    EFF_CHECK(off.numel() == 0, name, ": empty bitmaps (the dense layout) need empty strip_offsets");
    EFF_CHECK(vals.device().is_cpu() && vals.scalar_type() == at::kBFloat16 && vals.is_contiguous() &&
                  vals.dim() == 1 && vals.numel() == strips * k_tiles * 512,
              name, " values of the dense layout must be contiguous bf16 [", strips * k_tiles * 512,
              "] (every value of ", strips, " strips x ", k_tiles, " tiles x 16 x 32)");
    return {};
  }
  EFF_CHECK(bm.device().is_cpu() && bm.scalar_type() == at::kInt && bm.is_contiguous() && bm.dim() == 3 &&
                bm.size(0) == strips && bm.size(1) == k_tiles && bm.size(2) == 16,
            name, " bitmaps must be contiguous int32 [", strips, ", ", k_tiles, ", 16]");
  EFF_CHECK(off.device().is_cpu() && off.scalar_type() == at::kLong && off.is_contiguous() && off.dim() == 1 &&
                off.numel() == strips + 1,
            name, " strip_offsets must be contiguous int64 [", strips + 1, "]");
  const int64_t* o = off.data_ptr<int64_t>();
  EFF_CHECK(o[0] == 0 && o[strips] >= 0, name, " strip_offsets must start at 0");
  EFF_CHECK(vals.device().is_cpu() && vals.scalar_type() == at::kBFloat16 && vals.is_contiguous() &&
                vals.dim() == 1 && vals.numel() >= o[strips] + 32,
            name, " values must be contiguous bf16 with at least ", o[strips] + 32, " elements (nonzeros + slack)");
  return {};
}

template <typename T>
inline float to_f32(T v) { return static_cast<float>(v); }
template <>
inline float to_f32<c10::BFloat16>(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
void attend(const float* qf, int64_t dp, const at::Tensor& k_bitmaps, const at::Tensor& k_values,
            const at::Tensor& k_offsets, const at::Tensor& v_bitmaps, const at::Tensor& v_values,
            const at::Tensor& v_offsets, const T* k_tail, const T* v_tail, int64_t hq, int64_t hkv, int64_t d,
            int64_t s_len, int64_t t_len, float scale, SpmvFn spmv, float* out) {
  const int64_t g = hq / hkv, sp = (s_len + 15) / 16 * 16, spv = (s_len + 31) / 32 * 32, w = spv + t_len;
  std::vector<float> scores(static_cast<size_t>(hq * w));
  float* sc = scores.data();
  const int64_t k_strips_per_head = sp / 16, v_strips_per_head = d / 16;
  // null bitmaps tell the strip kernels that the layout is dense
  const int32_t* kbm = k_bitmaps.numel() ? k_bitmaps.data_ptr<int32_t>() : nullptr;
  const uint16_t* kval = reinterpret_cast<const uint16_t*>(k_values.data_ptr());
  const int64_t* koff = k_offsets.numel() ? k_offsets.data_ptr<int64_t>() : nullptr;
  const int32_t* vbm = v_bitmaps.numel() ? v_bitmaps.data_ptr<int32_t>() : nullptr;
  const uint16_t* vval = reinterpret_cast<const uint16_t*>(v_values.data_ptr());
  const int64_t* voff = v_offsets.numel() ? v_offsets.data_ptr<int64_t>() : nullptr;

  // 1. scores[i, 0:Sp] = q_i . K_h rows (all strips of all heads, split among threads)
  at::parallel_for(0, hkv * k_strips_per_head, 8, [&](int64_t b, int64_t e) {
    for (int64_t h = b / k_strips_per_head; h < hkv && h * k_strips_per_head < e; ++h) {
      const int64_t sb = std::max(b, h * k_strips_per_head), se = std::min(e, (h + 1) * k_strips_per_head);
      F32Problem p{qf + h * g * dp, g, dp, kbm, kval, koff, dp / 32, h * k_strips_per_head, sc + h * g * w, w};
      spmv(p, sb, se);
    }
  });
  // 2. tail scores, then softmax over the S pruned positions and the T tail ones; P = 0 on [S, Spv)
  at::parallel_for(0, hq, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t h = i / g;
      float* row = sc + i * w;
      const float* qi = qf + i * dp;
      for (int64_t t = 0; t < t_len; ++t) {
        const T* kt = k_tail + (h * t_len + t) * d;
        float acc = 0.f;
        for (int64_t j = 0; j < d; ++j) acc += qi[j] * to_f32(kt[j]);
        row[spv + t] = acc;
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < s_len; ++j) mx = std::max(mx, row[j] * scale);
      for (int64_t t = 0; t < t_len; ++t) mx = std::max(mx, row[spv + t] * scale);
      float sum = 0.f;
      for (int64_t j = 0; j < s_len; ++j) sum += (row[j] = std::exp(row[j] * scale - mx));
      for (int64_t t = 0; t < t_len; ++t) sum += (row[spv + t] = std::exp(row[spv + t] * scale - mx));
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < s_len; ++j) row[j] *= inv;
      for (int64_t j = s_len; j < spv; ++j) row[j] = 0.f;
      for (int64_t t = 0; t < t_len; ++t) row[spv + t] *= inv;
    }
  });
  // 3. out[i, strip cols] = P_i[0:Spv] . V^T strip rows + P_i[tail] . V_tail (16 head dims per work item)
  at::parallel_for(0, hkv * v_strips_per_head, 1, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      const int64_t h = s / v_strips_per_head;
      F32Problem p{sc + h * g * w, g, w, vbm, vval, voff, spv / 32, h * v_strips_per_head, out + h * g * d, d};
      spmv(p, s, s + 1);
      const int64_t c0 = (s - h * v_strips_per_head) * 16;
      for (int64_t i = h * g; i < (h + 1) * g; ++i) {
        float* o = out + i * d + c0;
        const float* pt = sc + i * w + spv;
        for (int64_t t = 0; t < t_len; ++t) {
          const T* vt = v_tail + (h * t_len + t) * d + c0;
          for (int j = 0; j < 16; ++j) o[j] += pt[t] * to_f32(vt[j]);
        }
      }
    }
  });
}

at::Tensor op_sparse_kv_attention(const at::Tensor& q, const at::Tensor& k_bitmaps, const at::Tensor& k_values,
                                  const at::Tensor& k_offsets, const at::Tensor& v_bitmaps,
                                  const at::Tensor& v_values, const at::Tensor& v_offsets, const at::Tensor& k_tail,
                                  const at::Tensor& v_tail, int64_t seq_len, double scale, int64_t kernel) {
  SpmvFn spmv = nullptr;
  std::string err = kv_kernel(kernel, spmv);
  auto shape_checks = [&]() -> std::string {
    EFF_CHECK(q.device().is_cpu() && q.dim() == 2 && at::isFloatingType(q.scalar_type()),
              "q must be a floating-point CPU tensor [query_heads, head_dim]");
    EFF_CHECK(k_tail.device().is_cpu() && k_tail.dim() == 3 && k_tail.is_contiguous() && v_tail.is_contiguous() &&
                  v_tail.sizes() == k_tail.sizes() && v_tail.scalar_type() == k_tail.scalar_type() &&
                  (k_tail.scalar_type() == at::kFloat || k_tail.scalar_type() == at::kBFloat16),
              "k_tail and v_tail must be contiguous float32 or bf16 CPU tensors of one shape [kv_heads, T, head_dim]");
    const int64_t hq = q.size(0), d = q.size(1), hkv = k_tail.size(0);
    EFF_CHECK(k_tail.size(2) == d, "k_tail has head_dim ", k_tail.size(2), ", q has ", d);
    EFF_CHECK(hkv > 0 && hq % hkv == 0, "query heads (", hq, ") must be a multiple of kv heads (", hkv, ")");
    EFF_CHECK(d > 0 && d % 16 == 0, "head_dim must be a positive multiple of 16, got ", d);
    EFF_CHECK(seq_len > 0, "seq_len (pruned positions) must be positive, got ", seq_len);
    EFF_CHECK(std::isfinite(scale), "scale must be finite");
    const int64_t sp = (seq_len + 15) / 16 * 16, spv = (seq_len + 31) / 32 * 32;
    EFF_CHECK((k_bitmaps.numel() == 0) == (v_bitmaps.numel() == 0), "K and V^T must both be packed or both dense");
    EFF_TRY(check_packed(k_bitmaps, k_values, k_offsets, hkv * sp / 16, (d + 31) / 32, "K"));
    EFF_TRY(check_packed(v_bitmaps, v_values, v_offsets, hkv * d / 16, spv / 32, "V^T"));
    return {};
  };
  if (err.empty()) err = shape_checks();
  TORCH_CHECK(err.empty(), err);
  const int64_t hq = q.size(0), d = q.size(1), hkv = k_tail.size(0), t_len = k_tail.size(1);
  const int64_t dp = (d + 31) / 32 * 32;
  at::Tensor qf = at::zeros({hq, dp}, q.options().dtype(at::kFloat));
  qf.narrow(1, 0, d).copy_(q);
  at::Tensor out = at::empty({hq, d}, q.options().dtype(at::kFloat));
  if (k_tail.scalar_type() == at::kFloat) {
    attend<float>(qf.data_ptr<float>(), dp, k_bitmaps, k_values, k_offsets, v_bitmaps, v_values, v_offsets,
                  k_tail.data_ptr<float>(), v_tail.data_ptr<float>(), hq, hkv, d, seq_len, t_len,
                  static_cast<float>(scale), spmv, out.data_ptr<float>());
  } else {
    attend<c10::BFloat16>(qf.data_ptr<float>(), dp, k_bitmaps, k_values, k_offsets, v_bitmaps, v_values, v_offsets,
                          k_tail.data_ptr<c10::BFloat16>(), v_tail.data_ptr<c10::BFloat16>(), hq, hkv, d, seq_len,
                          t_len, static_cast<float>(scale), spmv, out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effllm_sparse, m) {
  m.def("sparse_kv_attention(Tensor q, Tensor k_bitmaps, Tensor k_values, Tensor k_offsets, Tensor v_bitmaps, "
        "Tensor v_values, Tensor v_offsets, Tensor k_tail, Tensor v_tail, int seq_len, float scale, int kernel) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(effllm_sparse, CPU, m) { m.impl("sparse_kv_attention", &op_sparse_kv_attention); }
