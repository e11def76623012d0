// Torch glue for the CUDA consensus kernel: fills ConsensusParams from the tensors and launches on the current
// stream. Schema and checks in streamkern/ops/consensus_frame_scores.h.
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
  check_consensus_args(out, chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights);

  const c10::cuda::CUDAGuard guard(chunk_k.device());
  ConsensusParams p{};
  p.out = out.data_ptr<float>();
  p.chunk = chunk_k.const_data_ptr();
  p.text = text_k.const_data_ptr();
  p.weights = entity_weights.const_data_ptr();
  p.weights_dtype = dtype_of(entity_weights);
  p.B = chunk_k.size(1);
  p.L = chunk_k.size(2);
  p.S = text_k.size(2);
  p.H = chunk_k.size(3);
  p.D = chunk_k.size(4);
  p.frame_seq_len = frame_seq_len;
  for (int i = 0; i < 5; ++i) {
    p.chunk_stride[i] = chunk_k.stride(i);
    p.text_stride[i] = text_k.stride(i);
  }
  p.weights_stride_b = entity_weights.dim() == 2 ? entity_weights.stride(0) : 0;
  p.weights_stride_s = entity_weights.stride(-1);
  p.layers = layers.data();
  p.layer_weights = layer_weights.data();
  p.num_layers = static_cast<int32_t>(layers.size());
  STREAMKERN_CHECK_LAUNCH(consensus_frame_scores_launch(p, dtype_of(chunk_k), at::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) {
  m.impl("consensus_frame_scores_", &streamkern::consensus_frame_scores_cuda);
}
