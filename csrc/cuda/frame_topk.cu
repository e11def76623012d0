// frame_topk CUDA kernel (see streamkern/ops/frame_topk.h): one block per output row. qbar (float32 column sums
// over Lq, coalesced over d) and the C scores (one warp per candidate, shuffle-reduced) sit in shared memory;
// every valid candidate counts the candidates ranked before it (frame_topk_before) and writes itself at that
// rank when it is below k; ranks from the number of valid candidates up to k get -1. int64 offsets throughout.
#include <cuda_runtime.h>

#include "streamkern/cuda_utils.cuh"
#include "streamkern/ops/frame_topk.h"

namespace streamkern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads) frame_topk_kernel(FrameTopkParams p) {
  extern __shared__ float shared[];
  __shared__ int n_valid;
  const int64_t heads = p.per_head ? 1 : p.H;  // heads summed by this block
  const int64_t b = p.per_head ? blockIdx.x / p.H : blockIdx.x;
  const int64_t h0 = p.per_head ? blockIdx.x % p.H : 0;
  float* qbar = shared;                 // [heads * D]
  float* score = shared + heads * p.D;  // [C]
  if (threadIdx.x == 0) n_valid = 0;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
  for (int64_t col = threadIdx.x; col < heads * p.D; col += kThreads) {
    const T* qc = q + (h0 + col / p.D) * p.q_stride[2] + (col % p.D) * p.q_stride[3];
    float sum = 0.f;
    for (int64_t i = 0; i < p.Lq; ++i) sum += to_float(qc[i * p.q_stride[1]]);
    qbar[col] = sum / static_cast<float>(p.Lq);
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t* cand = p.candidates + b * p.cand_stride[0];
  for (int64_t c = warp; c < p.C; c += kThreads / 32) {
    const int64_t id = cand[c * p.cand_stride[1]];
    if (id < 0 || id >= p.P) continue;  // warp-uniform
    const float* km = p.k_mean + b * p.mean_stride[0] + id * p.mean_stride[1];
    float dot = 0.f;
    for (int64_t col = lane; col < heads * p.D; col += 32)
      dot += qbar[col] * km[(h0 + col / p.D) * p.mean_stride[2] + (col % p.D) * p.mean_stride[3]];
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) {
      score[c] = dot / static_cast<float>(heads);
      atomicAdd(&n_valid, 1);
    }
  }
  __syncthreads();
  int64_t* out = p.out + b * p.out_stride[0] + h0 * p.out_stride[1];
  for (int64_t c = threadIdx.x; c < p.C; c += kThreads) {
    const int64_t id = cand[c * p.cand_stride[1]];
    if (id < 0 || id >= p.P) continue;
    int64_t rank = 0;
    for (int64_t o = 0; o < p.C && rank < p.k; ++o) {
      const int64_t other = cand[o * p.cand_stride[1]];
      if (o != c && other >= 0 && other < p.P && frame_topk_before(score[o], o, score[c], c)) ++rank;
    }
    if (rank < p.k) out[rank * p.out_stride[2]] = id;
  }
  for (int64_t r = n_valid + threadIdx.x; r < p.k; r += kThreads) out[r * p.out_stride[2]] = -1;
}

}  // namespace

LaunchStatus frame_topk_launch(const FrameTopkParams& p, DType dtype, void* stream) {
  const int64_t rows = p.B * (p.per_head ? p.H : 1);
  if (rows == 0 || p.k == 0) return static_cast<int>(cudaSuccess);
  const int64_t shared_bytes = ((p.per_head ? 1 : p.H) * p.D + p.C) * static_cast<int64_t>(sizeof(float));
  if (shared_bytes > kMaxSharedBytes || rows > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  STREAMKERN_DISPATCH_FLOAT(dtype, T,
      frame_topk_kernel<T><<<static_cast<unsigned>(rows), kThreads, static_cast<size_t>(shared_bytes),
                             static_cast<cudaStream_t>(stream)>>>(p));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace streamkern
