// Torch glue for the CUDA verify_scales kernels: fills VerifyParams from the tensors and launches on the current
// stream. The schema streamkern_C::verify_scales_ is defined with the CPU kernel in csrc/cpu/verify.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../cuda/verify.cuh"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

bool rows_aligned16(const at::Tensor& t) {
  const int64_t size = t.element_size();
  return t.stride(2) == 1 && (t.size(2) * size) % 16 == 0 && (t.stride(0) * size) % 16 == 0 &&
         (t.stride(1) * size) % 16 == 0 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

void verify_scales_cuda(at::Tensor& accepted, at::Tensor& match, at::Tensor& ratio, at::Tensor& tokens,
                        at::Tensor& stats, const at::Tensor& logits, const at::Tensor& draft_tokens,
                        const c10::optional<at::Tensor>& draft_probs, const c10::optional<at::Tensor>& uniforms,
                        at::IntArrayRef offsets, c10::optional<at::ArrayRef<double>> cfg, bool greedy,
                        double threshold, double temperature) {
  TORCH_CHECK(logits.dim() == 3 && draft_tokens.dim() == 2, "verify_scales_: logits [B or 2B, T, V], draft [B, T]");
  const int64_t B = draft_tokens.size(0), T = draft_tokens.size(1), V = logits.size(2);
  const int64_t NS = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(NS >= 1 && NS <= kVerifyMaxScales && offsets.back() == T, "verify_scales_: bad offsets");
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

  const c10::cuda::CUDAGuard guard(logits.device());
  VerifyParams p{};
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
  STREAMKERN_CHECK_LAUNCH(verify_launch(p, dtype_of(logits), at::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("verify_scales_", &streamkern::verify_scales_cuda); }
