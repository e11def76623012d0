// Torch glue of the CUDA bank_evict_select_ (schema in csrc/cpu/bank_evict.cpp). Current stream, no sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/bank_evict.cuh"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void bank_evict_select_cuda(at::Tensor out, const at::Tensor& scores, const at::Tensor& entity_mask,
                            const at::Tensor& valid) {
  TORCH_CHECK(scores.is_cuda() && entity_mask.is_cuda() && valid.is_cuda() && out.is_cuda(),
              "bank_evict_select_: expected CUDA tensors");
  TORCH_CHECK(scores.dim() == 1 && entity_mask.dim() == 2 && valid.dim() == 1 && out.dim() == 0 &&
              entity_mask.size(0) == scores.size(0) && valid.size(0) == scores.size(0) &&
              entity_mask.scalar_type() == at::kBool && valid.scalar_type() == at::kBool &&
              out.scalar_type() == at::kLong && scores.size(0) >= 1 && scores.size(0) <= 64 &&
              entity_mask.size(1) <= 256,
              "bank_evict_select_: expected scores [M <= 64], bool entity_mask [M, E <= 256], bool valid [M], int64 out []");
  const c10::cuda::CUDAGuard guard(scores.device());
  BankEvictParams p{scores.data_ptr(), entity_mask.data_ptr<bool>(), valid.data_ptr<bool>(), out.data_ptr<int64_t>(),
                    static_cast<int>(scores.size(0)), static_cast<int>(entity_mask.size(1)), scores.stride(0),
                    entity_mask.stride(0), entity_mask.stride(1), valid.stride(0)};
  STREAMKERN_CHECK_LAUNCH(bank_evict_launch(p, dtype_of(scores), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("bank_evict_select_", &streamkern::bank_evict_select_cuda); }
