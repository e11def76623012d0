// Torch glue for the CUDA verify_scales kernels: fills VerifyParams from the tensors and launches on the current
// stream. The schema streamkern_C::verify_scales_ is defined with the CPU kernel in csrc/cpu/verify.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../cuda/verify.cuh"
#include "streamkern/op_checks.h"
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
  check_verify_scales_args(accepted, match, ratio, tokens, stats, logits, draft_tokens, draft_probs, uniforms, offsets,
                           cfg, greedy);
  const int64_t B = draft_tokens.size(0), T = draft_tokens.size(1), V = logits.size(2);
  const int64_t NS = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(NS <= kVerifyMaxScales, "verify_scales_: at most ", kVerifyMaxScales, " scales on CUDA, got ", NS);

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
