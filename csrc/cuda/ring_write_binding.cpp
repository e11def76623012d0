// Torch glue of the CUDA ring_write_ and ring_write_at_: checks and parameters from streamkern/ops/ring_write.h,
// the token-row copy of csrc/cuda/token_copy.cu on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "streamkern/token_copy.cuh"
#include "streamkern/ops/ring_write.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void ring_write_cuda(at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& k_new, const at::Tensor& v_new,
                     int64_t start, int64_t sink) {
  TORCH_CHECK(cache_k.is_cuda(), "ring_write_: cache_k must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(cache_k.device());
  const TokenCopyParams p = ring_write_params(cache_k, cache_v, k_new, v_new, start, sink);
  STREAMKERN_CHECK_LAUNCH(token_copy_launch(p, dtype_of(cache_k), at::cuda::getCurrentCUDAStream()));
}

void ring_write_at_cuda(at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& k_new, const at::Tensor& v_new,
                        const at::Tensor& start, int64_t sink) {
  TORCH_CHECK(cache_k.is_cuda(), "ring_write_at_: cache_k must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(cache_k.device());
  const TokenCopyParams p = ring_write_params(cache_k, cache_v, k_new, v_new, start, sink);
  STREAMKERN_CHECK_LAUNCH(token_copy_launch(p, dtype_of(cache_k), at::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) {
  m.impl("ring_write_", &streamkern::ring_write_cuda);
  m.impl("ring_write_at_", &streamkern::ring_write_at_cuda);
}
