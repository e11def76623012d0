// Torch glue of the CUDA frame_write_ (schema in csrc/cpu/frame_write.cpp): checks and parameters from
// streamkern/ops/frame_write.h, launch on the current stream, no sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "streamkern/ops/frame_write.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void frame_write_cuda(at::Tensor pool_k, at::Tensor pool_v, at::Tensor k_mean, const at::Tensor& k_new,
                      const at::Tensor& v_new, const at::Tensor& pages) {
  const FrameWriteParams p = frame_write_params(pool_k, pool_v, k_mean, k_new, v_new, pages);
  TORCH_CHECK_VALUE(pool_k.is_cuda(), "frame_write_: the cuda kernel needs CUDA tensors, got ", pool_k.device());
  const c10::cuda::CUDAGuard guard(pool_k.device());
  STREAMKERN_CHECK_LAUNCH(frame_write_launch(p, dtype_of(pool_k), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("frame_write_", &streamkern::frame_write_cuda); }
