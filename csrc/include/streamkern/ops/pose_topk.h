// pose_topk_ (docs/contract.md §4.2): the torch-free parameters shared by the CPU kernel (csrc/cpu/pose_topk.cpp) and the
// CUDA launcher (csrc/cuda/pose_topk.cu), and, outside nvcc, the op schema and the parameters read off the tensors
// with the checks its C++ entry points repeat for direct calls.
#pragma once
#include <cstdint>

#include "streamkern/common.h"
#include "streamkern/rank_keys.h"

namespace streamkern {

struct PoseTopkParams {
  const void* poses;    // [N, P >= 3], strides p0, p1
  const bool* valid;    // [N], stride s_v
  const void* current;  // [P], stride s_c
  int64_t* idx;         // [k] contiguous
  float* sim;           // [k] contiguous
  int N, k;             // 0 <= N < 65536 (CUDA: <= 4096), 0 <= k <= 4096 (rows past N are padding)
  int64_t p0, p1, s_c, s_v;
  double scale;
};

// One block of 1024 threads: float64 similarities, packed keys (rank_keys.h pose_key) in 32 KB of shared
// memory, an ascending bitonic sort over the next power of two >= N, the first k keys decoded.
LaunchStatus pose_topk_launch(const PoseTopkParams& p, DType dtype, void* stream);

}  // namespace streamkern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace streamkern {

inline constexpr const char* kPoseTopkSchema =
    "pose_topk_(Tensor(a!) idx, Tensor(b!) sim, Tensor poses, Tensor valid, Tensor current, float scale) -> ()";

// poses [N < 65536, P >= 3] and current [P] of one dtype, bool valid [N], int64 idx and float32 sim [k <= 4096],
// contiguous; one device.
inline PoseTopkParams pose_topk_params(at::Tensor& idx, at::Tensor& sim, const at::Tensor& poses,
                                       const at::Tensor& valid, const at::Tensor& current, double scale) {
  TORCH_CHECK(poses.dim() == 2 && poses.size(1) >= 3 && poses.size(0) < (int64_t{1} << kPoseIndexBits) &&
                  valid.dim() == 1 && valid.size(0) == poses.size(0) && current.dim() == 1 &&
                  current.size(0) == poses.size(1) && current.scalar_type() == poses.scalar_type() &&
                  valid.scalar_type() == at::kBool && idx.scalar_type() == at::kLong &&
                  sim.scalar_type() == at::kFloat && idx.is_contiguous() && sim.is_contiguous() &&
                  idx.numel() == sim.numel() && idx.numel() <= 4096,
              "pose_topk_: expected poses [N < 65536, P >= 3], bool valid [N], current [P] of poses' dtype, ",
              "contiguous int64 idx and float32 sim [k <= 4096]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&idx, &sim, &valid, &current})
    TORCH_CHECK(t->device() == poses.device(), "pose_topk_: every tensor must be on poses' device");
  return {poses.data_ptr(), valid.data_ptr<bool>(), current.data_ptr(), idx.data_ptr<int64_t>(),
          sim.data_ptr<float>(), static_cast<int>(poses.size(0)), static_cast<int>(idx.numel()),
          poses.stride(0), poses.stride(1), current.stride(0), valid.stride(0), scale};
}

}  // namespace streamkern
#endif  // !__CUDACC__
