// pose_topk CUDA kernel: one block, shared-memory bitonic sort of packed keys (see streamkern/ops/pose_topk.h).
#include <cuda_runtime.h>

#include "streamkern/ops/pose_topk.h"
#include "streamkern/cuda_utils.cuh"
#include "streamkern/rank_keys.h"

namespace streamkern {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxEntries = 4096;

template <typename T>
__global__ void __launch_bounds__(kThreads) pose_topk_kernel(PoseTopkParams p, int n2) {
  __shared__ unsigned long long keys[kMaxEntries];
  const T* poses = static_cast<const T*>(p.poses);
  const T* cur = static_cast<const T*>(p.current);
  const double cx = to_float(cur[0]), cy = to_float(cur[p.s_c]), cz = to_float(cur[2 * p.s_c]);
  for (int i = threadIdx.x; i < n2; i += kThreads) {
    unsigned long long key = kPosePad;
    if (i < p.N) {
      const T* row = poses + i * p.p0;
      const float s = pose_similarity(static_cast<double>(to_float(row[0])) - cx,
                                      static_cast<double>(to_float(row[p.p1])) - cy,
                                      static_cast<double>(to_float(row[2 * p.p1])) - cz, p.scale);
      key = pose_key(p.valid[i * p.s_v], s, i);
    }
    keys[i] = key;
  }
  for (int size = 2; size <= n2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < n2; i += kThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const unsigned long long a = keys[i], b = keys[j];
          if ((a > b) == ((i & size) == 0)) {
            keys[i] = b;
            keys[j] = a;
          }
        }
      }
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < p.k; r += kThreads) {
    const unsigned long long key = r < n2 ? keys[r] : kPosePad;  // k > N: padding
    const bool chosen = pose_key_chosen(key);
    p.idx[r] = chosen ? pose_key_index(key) : -1;
    p.sim[r] = chosen ? pose_key_sim(key) : 0.0f;
  }
}

}  // namespace

LaunchStatus pose_topk_launch(const PoseTopkParams& p, DType dtype, void* stream) {
  if (p.N < 0 || p.N > kMaxEntries || p.k < 0 || p.k > kMaxEntries) return static_cast<int>(cudaErrorInvalidValue);
  if (p.k == 0) return static_cast<int>(cudaSuccess);
  int n2 = 2;
  while (n2 < p.N) n2 <<= 1;
  STREAMKERN_DISPATCH_FLOAT(dtype, T,
      pose_topk_kernel<T><<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, n2));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace streamkern
