// Torch glue for the CUDA consensus kernel: fills ConsensusParams from the tensors and launches on the current
// stream. The schema streamkern_C::consensus_scores_ is defined with the CPU kernel in csrc/cpu/consensus.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../cuda/consensus.cuh"
#include "streamkern/torch_utils.h"

namespace streamkern {
namespace {

void consensus_scores_cuda(at::Tensor out, const at::Tensor& chunk_k, const at::Tensor& text_k,
                           const at::Tensor& entity_weights, int64_t frame_seq_len, at::IntArrayRef layers,
                           at::ArrayRef<double> layer_weights) {
  TORCH_CHECK(chunk_k.dim() == 5 && text_k.dim() == 5, "consensus_scores_: chunk_k and text_k must be 5-d");
  TORCH_CHECK(chunk_k.scalar_type() == text_k.scalar_type(), "consensus_scores_: chunk_k/text_k dtype mismatch");
  TORCH_CHECK(chunk_k.is_cuda() && text_k.device() == chunk_k.device() && entity_weights.device() == chunk_k.device() &&
                  out.device() == chunk_k.device(),
              "consensus_scores_: all tensors must be on one CUDA device");
  const int64_t NL = chunk_k.size(0), B = chunk_k.size(1), L = chunk_k.size(2);
  TORCH_CHECK(text_k.size(0) == NL && text_k.size(1) == B && text_k.size(3) == chunk_k.size(3) &&
                  text_k.size(4) == chunk_k.size(4),
              "consensus_scores_: text_k ", text_k.sizes(), " does not match chunk_k ", chunk_k.sizes());
  const int64_t S = text_k.size(2);
  TORCH_CHECK(entity_weights.dim() == 1 ? entity_weights.size(0) == S
                                        : entity_weights.dim() == 2 && entity_weights.size(0) == B &&
                                              entity_weights.size(1) == S,
              "consensus_scores_: entity_weights must be [S] or [B, S], got ", entity_weights.sizes());
  TORCH_CHECK(frame_seq_len >= 1 && L % frame_seq_len == 0, "consensus_scores_: frame_seq_len must divide L");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == B &&
                  out.size(1) == L / frame_seq_len,
              "consensus_scores_: out must be a contiguous float32 [B, F] tensor");
  TORCH_CHECK(!layers.empty() && layers.size() == layer_weights.size(),
              "consensus_scores_: layers and layer_weights must be non-empty and of equal length");
  for (const int64_t l : layers) TORCH_CHECK(l >= 0 && l < NL, "consensus_scores_: layer ", l, " out of range");

  const c10::cuda::CUDAGuard guard(chunk_k.device());
  ConsensusParams p{};
  p.out = out.data_ptr<float>();
  p.chunk = chunk_k.const_data_ptr();
  p.text = text_k.const_data_ptr();
  p.weights = entity_weights.const_data_ptr();
  p.weights_dtype = dtype_of(entity_weights);
  p.B = B;
  p.L = L;
  p.S = S;
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
  STREAMKERN_CHECK_LAUNCH(consensus_scores_launch(p, dtype_of(chunk_k), at::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_IMPL(streamkern_C, CUDA, m) { m.impl("consensus_scores_", &streamkern::consensus_scores_cuda); }
