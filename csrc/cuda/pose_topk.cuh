// pose_topk on CUDA (DESIGN.md §4.2): torch-free parameters and launcher.
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

struct PoseTopkParams {
  const void* poses;    // [N, P >= 3], strides p0, p1
  const bool* valid;    // [N], stride s_v
  const void* current;  // [P], stride s_c
  int64_t* idx;         // [k] contiguous
  float* sim;           // [k] contiguous
  int N, k;             // 0 <= N <= 4096, 0 <= k <= 4096 (rows past N are padding)
  int64_t p0, p1, s_c, s_v;
  double scale;
};

// One block of 1024 threads: float64 similarities, packed keys (rank_keys.h pose_key) in 32 KB of shared
// memory, an ascending bitonic sort over the next power of two >= N, the first k keys decoded.
LaunchStatus pose_topk_launch(const PoseTopkParams& p, DType dtype, void* stream);

}  // namespace streamkern
