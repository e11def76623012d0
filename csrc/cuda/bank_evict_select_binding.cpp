// Torch glue of the CUDA bank_evict_select_: checks and parameters from streamkern/ops/bank_evict_select.h,
// launch on the current stream, no sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "streamkern/ops/bank_evict_select.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void bank_evict_select_cuda(at::Tensor out, const at::Tensor& scores, const at::Tensor& entity_mask,
                            const at::Tensor& valid) {
  const BankEvictSelectParams p = bank_evict_select_params(out, scores, entity_mask, valid);
  TORCH_CHECK_VALUE(scores.is_cuda(), "bank_evict_select_: the cuda kernel needs CUDA tensors, got ", scores.device());
  const c10::cuda::CUDAGuard guard(scores.device());
  STREAMKERN_CHECK_LAUNCH(bank_evict_select_launch(p, dtype_of(scores), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("bank_evict_select_", &streamkern::bank_evict_select_cuda); }
