// Torch glue of the drift gate CUDA kernels: checks and parameters from streamkern/ops/drift_gate.h, launches on
// the current stream. The gate's partial drifts and the patch-importance workspace come from the caching
// allocator (no sync).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "streamkern/ops/drift_gate.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void attention_weighted_drift_cuda(at::Tensor drift, at::Tensor small, const at::Tensor& image,
                                   const at::Tensor& prev_small, const at::Tensor& importance, int64_t pool,
                                   int64_t dilation) {
  const AttentionWeightedDriftParams p = attention_weighted_drift_params(drift, small, image, prev_small, importance, pool,
                                                                dilation);
  const c10::cuda::CUDAGuard guard(image.device());
  STREAMKERN_CHECK_LAUNCH(
      attention_weighted_drift_launch(p, dtype_of(image), at::cuda::getCurrentCUDAStream().stream()));
}

void drift_gate_step_cuda(at::Tensor recompute, at::Tensor reason, at::Tensor drift, at::Tensor small,
                          at::Tensor counter, const at::Tensor& image, const std::optional<at::Tensor>& prev_small,
                          const std::optional<at::Tensor>& importance, const at::Tensor& state,
                          const std::optional<at::Tensor>& prev_state, int64_t pool, int64_t dilation,
                          double drift_threshold, double state_threshold) {
  DriftGateStepParams g = drift_gate_step_params(recompute, reason, drift, small, counter, image, prev_small, importance,
                                             state, prev_state, pool, dilation, drift_threshold, state_threshold);
  TORCH_CHECK(g.frame.B <= 65535, "drift_gate_step_: at most 65535 cameras per launch");
  const c10::cuda::CUDAGuard guard(image.device());
  g.splits = drift_gate_splits(g.frame.h, g.frame.w);
  at::Tensor partial = at::empty({g.frame.B, g.splits}, image.options().dtype(at::kFloat));
  g.partial = partial.data_ptr<float>();
  STREAMKERN_CHECK_LAUNCH(drift_gate_step_launch(g, dtype_of(image), at::cuda::getCurrentCUDAStream().stream()));
}

void patch_importance_cuda(at::Tensor out, const at::Tensor& attn, int64_t start, int64_t end, int64_t V, int64_t A) {
  check_patch_importance_args(out, attn, start, end, V, A);
  const c10::cuda::CUDAGuard guard(attn.device());
  PatchImportanceParams p{};
  p.B = attn.size(1);
  p.H = attn.size(2);
  p.S = attn.size(3);
  p.V = V;
  p.A = A;
  p.start = start;
  p.end = end;
  const int64_t rows = (end - start) * p.H * A;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.splits = std::max<int64_t>(1, std::min<int64_t>(rows / 8, 2 * sms / std::max<int64_t>(p.B, 1)));
  for (int i = 0; i < 5; ++i) p.s[i] = attn.stride(i);
  at::Tensor workspace = at::empty({p.B, p.splits, V}, attn.options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  p.workspace = workspace.data_ptr<float>();
  p.attn = attn.data_ptr();
  STREAMKERN_CHECK_LAUNCH(patch_importance_launch(p, dtype_of(attn), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) {
  m.impl("attention_weighted_drift_", &streamkern::attention_weighted_drift_cuda);
  m.impl("drift_gate_step_", &streamkern::drift_gate_step_cuda);
  m.impl("patch_importance_", &streamkern::patch_importance_cuda);
}
