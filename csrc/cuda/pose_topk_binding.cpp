// Torch glue of the CUDA pose_topk_: checks and parameters from streamkern/ops/pose_topk.h, launch on the current
// stream, no sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "streamkern/ops/pose_topk.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void pose_topk_cuda(at::Tensor idx, at::Tensor sim, const at::Tensor& poses, const at::Tensor& valid,
                    const at::Tensor& current, double scale) {
  const PoseTopkParams p = pose_topk_params(idx, sim, poses, valid, current, scale);
  TORCH_CHECK_VALUE(poses.is_cuda(), "pose_topk_: the cuda kernel needs CUDA tensors, got ", poses.device());
  TORCH_CHECK_VALUE(p.N <= 4096, "pose_topk_: the cuda kernel takes N <= 4096 entries, got ", p.N);
  const c10::cuda::CUDAGuard guard(poses.device());
  STREAMKERN_CHECK_LAUNCH(pose_topk_launch(p, dtype_of(poses), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("pose_topk_", &streamkern::pose_topk_cuda); }
