// Batched scale verification (DESIGN.md §4.4): torch-free CUDA launcher of verify_scales.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

constexpr int kVerifyMaxScales = 64;

struct VerifyParams {
  const void* logits;  // [B or 2B, T, V] (rows [B, 2B) unconditional when has_cfg), strides in elements
  int64_t sl0, sl1, sl2;
  bool logits_vec16;   // sl2 == 1, V a multiple of the 16-byte vector, every row 16-byte aligned
  const int64_t* draft;  // [B, T]
  int64_t sd0, sd1;
  const void* q;  // [B, T, V] draft probabilities (sample mode), dtype q_dtype
  DType q_dtype;
  int64_t sq0, sq1, sq2;
  const float* u;  // [B, T, 2] uniforms (sample mode)
  int64_t su0, su1, su2;
  bool* match;        // [B, T] contiguous
  int64_t* tokens;    // [B, T] contiguous
  float* ratio;       // [B, NS] contiguous
  int64_t* accepted;  // [B]
  float* stats;       // [B, T, 2] contiguous (row max, Σ exp) in sample mode
  int64_t B, T, V;
  int NS;
  int64_t offsets[kVerifyMaxScales + 1];  // window-relative token offsets of the scales
  float cfg[kVerifyMaxScales];            // per-scale guidance ratio (0 without CFG)
  bool has_cfg, greedy;
  float threshold, inv_temp;
};

// Three launches on `stream`: row pass, per-batch scale pass, and (sample mode) the residual redraw.
LaunchStatus verify_scales_launch(const VerifyParams& p, DType logits_dtype, cudaStream_t stream);

}  // namespace streamkern
