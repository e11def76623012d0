// Torch glue for the CUDA consensus kernel: checks and parameters from streamkern/ops/consensus_frame_scores.h,
// launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "streamkern/ops/consensus_frame_scores.h"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void consensus_frame_scores_cuda(at::Tensor out, const at::Tensor& chunk_k, const at::Tensor& text_k,
                                 const at::Tensor& entity_weights, int64_t frame_seq_len, at::IntArrayRef layers,
                                 at::ArrayRef<double> layer_weights) {
  TORCH_CHECK(chunk_k.is_cuda() && text_k.device() == chunk_k.device() && entity_weights.device() == chunk_k.device() &&
                  out.device() == chunk_k.device(),
              "consensus_frame_scores_: all tensors must be on one CUDA device");
  const ConsensusFrameScoresParams p =
      consensus_frame_scores_params(out, chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights);
  const c10::cuda::CUDAGuard guard(chunk_k.device());
  STREAMKERN_CHECK_LAUNCH(
      consensus_frame_scores_launch(p, dtype_of(chunk_k), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) {
  m.impl("consensus_frame_scores_", &streamkern::consensus_frame_scores_cuda);
}
