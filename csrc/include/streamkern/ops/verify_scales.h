// verify_scales_ (docs/contract.md §4.4): the torch-free parameters of the CUDA launcher (csrc/cuda/verify_scales.cu), and,
// outside nvcc, the op schema and the checks its C++ entry points (csrc/cpu/verify_scales.cpp, csrc/cuda/verify_scales_binding.cpp)
// repeat for direct calls.
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

constexpr int kVerifyMaxScales = 64;

struct VerifyScalesParams {
  const void* logits;  // [B or 2B, T, V] (rows [B, 2B) unconditional when has_cfg), strides in elements
  int64_t sl0, sl1, sl2;
  bool logits_vec16;   // sl2 == 1, V a multiple of the 16-byte vector, every row 16-byte aligned
  const int64_t* draft;  // [B, T]
  int64_t sd0, sd1;
  const void* q;  // [B, T, V] draft probabilities (sample mode), dtype q_dtype
  DType q_dtype;
  int64_t sq0, sq1, sq2;
  const float* u;  // [B, T, 2] uniforms (sample mode)
  int64_t su0, su1, su2;
  bool* match;        // [B, T] contiguous
  int64_t* tokens;    // [B, T] contiguous
  float* ratio;       // [B, NS] contiguous
  int64_t* accepted;  // [B]
  float* stats;       // [B, T, 2] contiguous (row max, Σ exp) in sample mode
  int64_t B, T, V;
  int NS;
  int64_t offsets[kVerifyMaxScales + 1];  // window-relative token offsets of the scales
  float cfg[kVerifyMaxScales];            // per-scale guidance ratio (0 without CFG)
  bool has_cfg, greedy;
  float threshold, inv_temp;
};

// Three launches on `stream`: row pass, per-batch scale pass, and (sample mode) the residual redraw.
LaunchStatus verify_scales_launch(const VerifyScalesParams& p, DType logits_dtype, void* stream);

}  // namespace streamkern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "streamkern/torch_utils.h"

namespace streamkern {

inline constexpr const char* kVerifyScalesSchema =
    "verify_scales_(Tensor(a!) accepted, Tensor(b!) match, Tensor(c!) ratio, Tensor(d!) tokens, "
    "Tensor(e!) stats, Tensor logits, Tensor draft_tokens, Tensor? draft_probs, Tensor? uniforms, "
    "int[] offsets, float[]? cfg, bool greedy, float threshold, float temperature) -> ()";

inline void check_verify_scales_args(const at::Tensor& accepted, const at::Tensor& match, const at::Tensor& ratio,
                                     const at::Tensor& tokens, const at::Tensor& stats, const at::Tensor& logits,
                                     const at::Tensor& draft_tokens, const c10::optional<at::Tensor>& draft_probs,
                                     const c10::optional<at::Tensor>& uniforms, at::IntArrayRef offsets,
                                     c10::optional<at::ArrayRef<double>> cfg, bool greedy) {
  TORCH_CHECK(logits.dim() == 3 && draft_tokens.dim() == 2, "verify_scales_: logits [B or 2B, T, V], draft [B, T]");
  const int64_t B = draft_tokens.size(0), T = draft_tokens.size(1), V = logits.size(2);
  const int64_t NS = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(NS >= 1 && offsets.back() == T, "verify_scales_: bad offsets");
  TORCH_CHECK(logits.size(0) == (cfg.has_value() ? 2 * B : B) && logits.size(1) == T,
              "verify_scales_: logits ", logits.sizes(), " do not match draft_tokens ", draft_tokens.sizes());
  TORCH_CHECK(!cfg.has_value() || static_cast<int64_t>(cfg->size()) == NS, "verify_scales_: cfg length");
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong, "verify_scales_: draft_tokens must be int64");
  TORCH_CHECK(greedy || (draft_probs.has_value() && draft_probs->dim() == 3 && draft_probs->size(0) == B &&
                         draft_probs->size(1) == T && draft_probs->size(2) == V && uniforms.has_value() &&
                         uniforms->dim() == 3 && uniforms->size(0) == B && uniforms->size(1) == T &&
                         uniforms->size(2) == 2 && uniforms->scalar_type() == at::kFloat),
              "verify_scales_: sample mode needs draft_probs [B, T, V] and float32 uniforms [B, T, 2]");
  for (const at::Tensor* out : {&accepted, &match, &ratio, &tokens})
    TORCH_CHECK(out->is_contiguous() && out->device() == logits.device(), "verify_scales_: outputs must be contiguous");
  TORCH_CHECK(greedy || (stats.is_contiguous() && stats.numel() == 2 * B * T), "verify_scales_: stats [B, T, 2]");
}

// Whether each [.., .., V] row of t starts 16-byte aligned and is contiguous (the vectorised logits path).
inline bool rows_aligned16(const at::Tensor& t) {
  const int64_t size = t.element_size();
  return t.stride(2) == 1 && (t.size(2) * size) % 16 == 0 && (t.stride(0) * size) % 16 == 0 &&
         (t.stride(1) * size) % 16 == 0 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The checks above (and the CUDA limit of kVerifyMaxScales scales), then the parameters read off the tensors.
inline VerifyScalesParams verify_scales_params(at::Tensor& accepted, at::Tensor& match, at::Tensor& ratio,
                                         at::Tensor& tokens, at::Tensor& stats, const at::Tensor& logits,
                                         const at::Tensor& draft_tokens, const c10::optional<at::Tensor>& draft_probs,
                                         const c10::optional<at::Tensor>& uniforms, at::IntArrayRef offsets,
                                         c10::optional<at::ArrayRef<double>> cfg, bool greedy, double threshold,
                                         double temperature) {
  check_verify_scales_args(accepted, match, ratio, tokens, stats, logits, draft_tokens, draft_probs, uniforms, offsets,
                           cfg, greedy);
  const int64_t B = draft_tokens.size(0), T = draft_tokens.size(1), V = logits.size(2);
  const int64_t NS = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(NS <= kVerifyMaxScales, "verify_scales_: at most ", kVerifyMaxScales, " scales on CUDA, got ", NS);
  VerifyScalesParams p{};
  p.logits = logits.const_data_ptr();
  p.sl0 = logits.stride(0);
  p.sl1 = logits.stride(1);
  p.sl2 = logits.stride(2);
  p.logits_vec16 = rows_aligned16(logits);
  p.draft = draft_tokens.const_data_ptr<int64_t>();
  p.sd0 = draft_tokens.stride(0);
  p.sd1 = draft_tokens.stride(1);
  if (!greedy) {
    p.q = draft_probs->const_data_ptr();
    p.q_dtype = dtype_of(*draft_probs);
    p.sq0 = draft_probs->stride(0);
    p.sq1 = draft_probs->stride(1);
    p.sq2 = draft_probs->stride(2);
    p.u = uniforms->const_data_ptr<float>();
    p.su0 = uniforms->stride(0);
    p.su1 = uniforms->stride(1);
    p.su2 = uniforms->stride(2);
    p.stats = stats.data_ptr<float>();
  }
  p.match = match.data_ptr<bool>();
  p.tokens = tokens.data_ptr<int64_t>();
  p.ratio = ratio.data_ptr<float>();
  p.accepted = accepted.data_ptr<int64_t>();
  p.B = B;
  p.T = T;
  p.V = V;
  p.NS = static_cast<int>(NS);
  for (int64_t s = 0; s <= NS; ++s) p.offsets[s] = offsets[s];
  for (int64_t s = 0; s < NS; ++s) p.cfg[s] = cfg.has_value() ? static_cast<float>((*cfg)[s]) : 0.f;
  p.has_cfg = cfg.has_value();
  p.greedy = greedy;
  p.threshold = static_cast<float>(threshold);
  p.inv_temp = static_cast<float>(1.0 / temperature);
  return p;
}

}  // namespace streamkern
#endif  // !__CUDACC__
