// Torch glue of the drift gate CUDA kernels: fills the parameter structs from tensors and launches on the current
// stream. The gate's partial drifts and the patch-importance workspace come from the caching allocator (no sync).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "streamkern/ops/drift_gate.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

WeightedDriftParams frame_params(at::Tensor& small, const at::Tensor& image, const at::Tensor* prev_small,
                                 const at::Tensor* importance, int64_t pool, int64_t dilation) {
  WeightedDriftParams p{};
  p.small = small.data_ptr();
  p.image = image.data_ptr();
  p.B = image.size(0);
  p.C = image.size(1);
  p.h = small.size(2);
  p.w = small.size(3);
  for (int i = 0; i < 4; ++i) p.si[i] = image.stride(i);
  if (prev_small != nullptr) {
    p.prev_small = prev_small->data_ptr();
    p.importance = importance->data_ptr<float>();
    for (int i = 0; i < 4; ++i) p.sp[i] = prev_small->stride(i);
    for (int i = 0; i < 3; ++i) p.simp[i] = importance->stride(i);
    p.gh = static_cast<int>(importance->size(1));
    p.gw = static_cast<int>(importance->size(2));
  }
  p.pool = static_cast<int>(pool);
  p.dilation = static_cast<int>(dilation);
  return p;
}

void attention_weighted_drift_cuda(at::Tensor drift, at::Tensor small, const at::Tensor& image,
                                   const at::Tensor& prev_small, const at::Tensor& importance, int64_t pool,
                                   int64_t dilation) {
  check_weighted_drift_args(drift, small, image, prev_small, importance, pool, dilation);
  const c10::cuda::CUDAGuard guard(image.device());
  WeightedDriftParams p = frame_params(small, image, &prev_small, &importance, pool, dilation);
  p.drift = drift.data_ptr<float>();
  STREAMKERN_CHECK_LAUNCH(attention_weighted_drift_launch(p, dtype_of(image), at::cuda::getCurrentCUDAStream().stream()));
}

void drift_gate_step_cuda(at::Tensor recompute, at::Tensor reason, at::Tensor drift, at::Tensor small,
                          at::Tensor counter, const at::Tensor& image, const std::optional<at::Tensor>& prev_small,
                          const std::optional<at::Tensor>& importance, const at::Tensor& state,
                          const std::optional<at::Tensor>& prev_state, int64_t pool, int64_t dilation,
                          double drift_threshold, double state_threshold) {
  check_gate_step_args(recompute, reason, drift, small, counter, image, prev_small, importance, state, prev_state,
                       pool, dilation);
  TORCH_CHECK(image.size(0) <= 65535, "drift_gate_step_: at most 65535 cameras per launch");
  const c10::cuda::CUDAGuard guard(image.device());
  DriftGateParams g{};
  g.frame = frame_params(small, image, prev_small ? &*prev_small : nullptr, importance ? &*importance : nullptr,
                         pool, dilation);
  g.splits = drift_gate_splits(g.frame.h, g.frame.w);
  at::Tensor partial = at::empty({g.frame.B, g.splits}, image.options().dtype(at::kFloat));
  g.partial = partial.data_ptr<float>();
  g.counter = counter.data_ptr<int>();
  g.recompute = recompute.data_ptr<bool>();
  g.reason = reason.data_ptr<int64_t>();
  g.drift = drift.data_ptr<float>();
  g.state = state.data_ptr();
  g.prev_state = prev_state ? prev_state->data_ptr() : nullptr;
  g.state_rows = state.size(0);
  g.state_cols = state.size(1);
  g.ss[0] = state.stride(0);
  g.ss[1] = state.stride(1);
  g.state_dtype = dtype_of(state);
  g.drift_threshold = drift_threshold;
  g.state_threshold = state_threshold;
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
