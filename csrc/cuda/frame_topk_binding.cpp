// Torch glue of the CUDA frame_topk_ (schema in csrc/cpu/frame_topk.cpp): checks and parameters from
// streamkern/ops/frame_topk.h, launch on the current stream, no sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "streamkern/ops/frame_topk.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void frame_topk_cuda(const at::Tensor& q, const at::Tensor& k_mean, const at::Tensor& candidates, int64_t k,
                     bool per_head, at::Tensor out) {
  const FrameTopkParams p = frame_topk_params(q, k_mean, candidates, k, per_head, out);
  TORCH_CHECK_VALUE(q.is_cuda(), "frame_topk_: the cuda kernel needs CUDA tensors, got ", q.device());
  const int64_t shared_floats = (per_head ? 1 : p.H) * p.D + p.C;
  TORCH_CHECK_VALUE(shared_floats * 4 <= 48 * 1024, "frame_topk_: the cuda kernel holds qbar and the scores in 48 KiB ",
                    "of shared memory: (", per_head ? "1" : "H", "·D + C) = ", shared_floats, " floats is too many");
  const c10::cuda::CUDAGuard guard(q.device());
  STREAMKERN_CHECK_LAUNCH(frame_topk_launch(p, dtype_of(q), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("frame_topk_", &streamkern::frame_topk_cuda); }
