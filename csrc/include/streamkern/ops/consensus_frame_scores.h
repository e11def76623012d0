// consensus_frame_scores_ (docs/contract.md §4.1): the torch-free parameters of the CUDA launcher
// (csrc/cuda/consensus_frame_scores.cu), and, outside nvcc, the op schema and the checks its C++ entry points
// (csrc/cpu/consensus_frame_scores.cpp, csrc/cuda/consensus_frame_scores_binding.cpp) repeat for direct calls.
//
//   out[b, f] = Σ_i λ_i / (H·√D·fsl) · Σ_{t ∈ f} chunk[l_i, b, t, :] · q_i[b, :]
//   q_i[b, :] = Σ_s w[b, s] · text[l_i, b, s, :] / (Σ_s w[b, s] + 1e-8)          (flattened H·D vectors)
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

struct ConsensusFrameScoresParams {
  float* out;                 // [B, F] contiguous float32, fully overwritten
  const void* chunk;          // [NL, B, L, H, D] storage type `dtype`
  const void* text;           // [NL, B, S, H, D] storage type `dtype`
  const void* weights;        // [S] or [B, S], storage type `weights_dtype`
  DType weights_dtype;
  int64_t B, L, S, H, D, frame_seq_len;
  int64_t chunk_stride[5];    // element strides of chunk (NL, B, L, H, D)
  int64_t text_stride[5];     // element strides of text (NL, B, S, H, D)
  int64_t weights_stride_b;   // 0 for [S] weights
  int64_t weights_stride_s;
  const int64_t* layers;      // host array of num_layers selected block ids, each in [0, NL)
  const double* layer_weights;  // host array of num_layers λ
  int32_t num_layers;
};

// Zeroes `out` and adds every selected layer's contribution: one kernel launch per 64 selected layers (one in
// practice). Returns the CUDA error (0 on success).
LaunchStatus consensus_frame_scores_launch(const ConsensusFrameScoresParams& p, DType dtype, void* stream);

}  // namespace streamkern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "streamkern/torch_utils.h"

namespace streamkern {

inline constexpr const char* kConsensusFrameScoresSchema =
    "consensus_frame_scores_(Tensor(a!) out, Tensor chunk_k, Tensor text_k, Tensor entity_weights, "
    "int frame_seq_len, int[] layers, float[] layer_weights) -> ()";

inline void check_consensus_frame_scores_args(const at::Tensor& out, const at::Tensor& chunk_k,
                                              const at::Tensor& text_k, const at::Tensor& entity_weights,
                                              int64_t frame_seq_len, at::IntArrayRef layers,
                                              at::ArrayRef<double> layer_weights) {
  TORCH_CHECK(chunk_k.dim() == 5 && text_k.dim() == 5, "consensus_frame_scores_: chunk_k and text_k must be 5-d");
  TORCH_CHECK(chunk_k.scalar_type() == text_k.scalar_type(), "consensus_frame_scores_: chunk_k/text_k dtype mismatch");
  const int64_t NL = chunk_k.size(0), B = chunk_k.size(1), L = chunk_k.size(2);
  TORCH_CHECK(text_k.size(0) == NL && text_k.size(1) == B && text_k.size(3) == chunk_k.size(3) &&
                  text_k.size(4) == chunk_k.size(4),
              "consensus_frame_scores_: text_k ", text_k.sizes(), " does not match chunk_k ", chunk_k.sizes());
  const int64_t S = text_k.size(2);
  TORCH_CHECK(entity_weights.dim() == 1 ? entity_weights.size(0) == S
                                        : entity_weights.dim() == 2 && entity_weights.size(0) == B &&
                                              entity_weights.size(1) == S,
              "consensus_frame_scores_: entity_weights must be [S] or [B, S], got ", entity_weights.sizes());
  TORCH_CHECK(frame_seq_len >= 1 && L % frame_seq_len == 0, "consensus_frame_scores_: frame_seq_len must divide L");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == B &&
                  out.size(1) == L / frame_seq_len,
              "consensus_frame_scores_: out must be a contiguous float32 [B, F] tensor");
  TORCH_CHECK(!layers.empty() && layers.size() == layer_weights.size(),
              "consensus_frame_scores_: layers and layer_weights must be non-empty and of equal length");
  for (const int64_t l : layers) TORCH_CHECK(l >= 0 && l < NL, "consensus_frame_scores_: layer ", l, " out of range");
}

// The checks above, then the parameters read off the tensors (layers and layer_weights stay host arrays).
inline ConsensusFrameScoresParams consensus_frame_scores_params(at::Tensor& out, const at::Tensor& chunk_k,
                                                     const at::Tensor& text_k, const at::Tensor& entity_weights,
                                                     int64_t frame_seq_len, at::IntArrayRef layers,
                                                     at::ArrayRef<double> layer_weights) {
  check_consensus_frame_scores_args(out, chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights);
  ConsensusFrameScoresParams p{};
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
  return p;
}

}  // namespace streamkern
#endif  // !__CUDACC__
