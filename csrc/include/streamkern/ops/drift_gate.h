// Drift gate CUDA kernels (DESIGN.md §4.3): torch-free parameters and launchers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

// drift[b] = Σ_yx mean_c|avgpool(image)[b,c,y,x] − prev_small[b,c,y,x]| · dilated_weight(y, x); small = avgpool(image).
struct WeightedDriftParams {
  float* drift;             // [B] float32
  void* small;              // [B, C, h, w] contiguous, dtype small_dtype
  const void* image;        // [B, C, H, W] strided
  const void* prev_small;   // [B, C, h, w] strided, dtype small_dtype
  const float* importance;  // [B, gh, gw] strided
  int64_t B, C, h, w;
  int64_t si[4], sp[4], simp[3];  // strides (elements) of image, prev_small, importance
  int gh, gw, pool, dilation;
};

// DriftGate.should_recompute in one launch: grid (splits, B); block (split, b) pools its share of camera b's cells
// (drift terms too when there is a previous frame) and writes partial[b, split]; the last block to finish (counter,
// reset to 0 on exit) applies the state guard, averages the drift over the cameras and writes the decision.
struct DriftGateParams {
  WeightedDriftParams frame;  // frame.drift unused; prev_small/importance null on the first frame
  float* partial;             // [B, splits]
  int* counter;               // one int32, 0 between launches
  bool* recompute;
  int64_t* reason;
  float* drift;
  const void* state;          // [R, K] strided
  const void* prev_state;     // [R, K] contiguous, null before the first update
  int64_t state_rows, state_cols, ss[2];
  DType state_dtype;          // float32/float64/float16/bfloat16
  double drift_threshold, state_threshold;
  int splits;
};

// out[b] = m / (Σ m + 1e-8), m[v] = mean over l in [start, end), heads, the last A rows q of attn[l, b, head, q, v].
struct PatchImportanceParams {
  float* out;               // [B, V] contiguous
  float* workspace;         // [B, splits, V]
  const void* attn;         // [NL, B, H, S, S] strided
  int64_t B, H, S, V, A, start, end, splits;
  int64_t s[5];
};

// image_dtype: float32/float16/bfloat16 (small in the same dtype) or uint8 (small float32, values / 255).
LaunchStatus attention_weighted_drift_launch(const WeightedDriftParams& p, DType image_dtype, cudaStream_t stream);
// Blocks per camera of drift_gate_step_launch (the size of DriftGateParams::partial is B × this).
int drift_gate_splits(int64_t h, int64_t w);
LaunchStatus drift_gate_step_launch(const DriftGateParams& p, DType image_dtype, cudaStream_t stream);
LaunchStatus patch_importance_launch(const PatchImportanceParams& p, DType attn_dtype, cudaStream_t stream);

}  // namespace streamkern
