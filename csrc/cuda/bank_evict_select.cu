// bank_evict_select CUDA kernel: one block, shared-memory coverage and keys (see streamkern/ops/bank_evict_select.h).
#include <cuda_runtime.h>

#include "streamkern/ops/bank_evict_select.h"
#include "streamkern/cuda_utils.cuh"
#include "streamkern/rank_keys.h"

namespace streamkern {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSlots = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads) bank_evict_select_kernel(BankEvictSelectParams p) {
  __shared__ bool lonely[kThreads];
  __shared__ unsigned long long keys[kMaxSlots];
  const int t = threadIdx.x;
  if (t < p.E) {
    int coverage = 0;
    for (int i = 0; i < p.M; ++i) coverage += p.mask[i * p.m0 + t * p.m1] ? 1 : 0;
    lonely[t] = coverage < 2;
  }
  __syncthreads();
  if (t < kMaxSlots) {
    unsigned long long key = ~0ull;
    if (t < p.M) {
      bool redundant = true;
      for (int e = 0; e < p.E && redundant; ++e) redundant = !(p.mask[t * p.m0 + e * p.m1] && lonely[e]);
      const float s = to_float(static_cast<const T*>(p.scores)[t * p.s_s]);
      key = evict_key(p.valid[t * p.s_v], redundant, s, t);
    }
    keys[t] = key;
  }
  __syncthreads();
  if (t == 0) {
    unsigned long long best = keys[0];
    for (int i = 1; i < kMaxSlots; ++i) best = keys[i] < best ? keys[i] : best;
    *p.out = evict_slot(best);
  }
}

}  // namespace

LaunchStatus bank_evict_select_launch(const BankEvictSelectParams& p, DType dtype, void* stream) {
  if (p.M < 1 || p.M > kMaxSlots || p.E < 0 || p.E > kThreads) return static_cast<int>(cudaErrorInvalidValue);
  STREAMKERN_DISPATCH_FLOAT(dtype, T,
      bank_evict_select_kernel<T><<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace streamkern
