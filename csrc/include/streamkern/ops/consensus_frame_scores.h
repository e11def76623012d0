// Consensus frame scoring (DESIGN.md §4.1): torch-free CUDA launcher on raw pointers and element strides.
//
//   out[b, f] = Σ_i λ_i / (H·√D·fsl) · Σ_{t ∈ f} chunk[l_i, b, t, :] · q_i[b, :]
//   q_i[b, :] = Σ_s w[b, s] · text[l_i, b, s, :] / (Σ_s w[b, s] + 1e-8)          (flattened H·D vectors)
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

struct ConsensusParams {
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
LaunchStatus consensus_frame_scores_launch(const ConsensusParams& p, DType dtype, cudaStream_t stream);

}  // namespace streamkern
