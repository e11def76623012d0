// Torch glue of the CUDA bank_insert_: checks and parameters from streamkern/ops/bank_insert.h, the token-row copy
// of csrc/cuda/token_copy.cu with the frame and slot indices read on the device; rows with an out-of-range index
// are skipped. Launches on the current stream, never synchronises.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "streamkern/token_copy.cuh"
#include "streamkern/ops/bank_insert.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void bank_insert_cuda(at::Tensor bank_k, at::Tensor bank_v, const at::Tensor& chunk_k, const at::Tensor& chunk_v,
                      const at::Tensor& frame_idx, const at::Tensor& slot, int64_t frame_seq_len) {
  TORCH_CHECK(bank_k.is_cuda(), "bank_insert_: bank_k must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(bank_k.device());
  const TokenCopyParams p = bank_insert_params(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, frame_seq_len);
  STREAMKERN_CHECK_LAUNCH(token_copy_launch(p, dtype_of(bank_k), at::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("bank_insert_", &streamkern::bank_insert_cuda); }
