// Torch glue for the CUDA verify_scales kernels: checks and parameters from streamkern/ops/verify_scales.h,
// launches on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "streamkern/ops/verify_scales.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void verify_scales_cuda(at::Tensor& accepted, at::Tensor& match, at::Tensor& ratio, at::Tensor& tokens,
                        at::Tensor& stats, const at::Tensor& logits, const at::Tensor& draft_tokens,
                        const c10::optional<at::Tensor>& draft_probs, const c10::optional<at::Tensor>& uniforms,
                        at::IntArrayRef offsets, c10::optional<at::ArrayRef<double>> cfg, bool greedy,
                        double threshold, double temperature) {
  const VerifyScalesParams p = verify_scales_params(accepted, match, ratio, tokens, stats, logits, draft_tokens,
                                              draft_probs, uniforms, offsets, cfg, greedy, threshold, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  STREAMKERN_CHECK_LAUNCH(verify_scales_launch(p, dtype_of(logits), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("verify_scales_", &streamkern::verify_scales_cuda); }
