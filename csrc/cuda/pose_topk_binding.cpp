// Torch glue of the CUDA pose_topk_ (schema in csrc/cpu/pose_topk.cpp). Current stream, no sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/pose_topk.cuh"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void pose_topk_cuda(at::Tensor idx, at::Tensor sim, const at::Tensor& poses, const at::Tensor& valid,
                    const at::Tensor& current, double scale) {
  TORCH_CHECK(poses.is_cuda() && valid.is_cuda() && current.is_cuda() && idx.is_cuda() && sim.is_cuda(),
              "pose_topk_: expected CUDA tensors");
  TORCH_CHECK(poses.dim() == 2 && poses.size(1) >= 3 && poses.size(0) <= 4096 && valid.dim() == 1 &&
              valid.size(0) == poses.size(0) && current.dim() == 1 && current.size(0) == poses.size(1) &&
              current.scalar_type() == poses.scalar_type() && valid.scalar_type() == at::kBool &&
              idx.scalar_type() == at::kLong && sim.scalar_type() == at::kFloat && idx.is_contiguous() &&
              sim.is_contiguous() && idx.numel() == sim.numel() && idx.numel() <= 4096,
              "pose_topk_: expected poses [N <= 4096, P >= 3], bool valid [N], current [P], contiguous idx/sim [k <= 4096]");
  const c10::cuda::CUDAGuard guard(poses.device());
  PoseTopkParams p{poses.data_ptr(), valid.data_ptr<bool>(), current.data_ptr(), idx.data_ptr<int64_t>(),
                   sim.data_ptr<float>(), static_cast<int>(poses.size(0)), static_cast<int>(idx.numel()),
                   poses.stride(0), poses.stride(1), current.stride(0), valid.stride(0), scale};
  STREAMKERN_CHECK_LAUNCH(pose_topk_launch(p, dtype_of(poses), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("pose_topk_", &streamkern::pose_topk_cuda); }
