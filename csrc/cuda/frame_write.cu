// frame_write CUDA kernel (see streamkern/ops/frame_write.h): one thread per (frame, h, d) column, so that a warp
// reads and writes 32 neighbouring d of one token row; int64 offsets throughout.
#include <cuda_runtime.h>

#include "streamkern/cuda_utils.cuh"
#include "streamkern/ops/frame_write.h"

namespace streamkern {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) frame_write_kernel(FrameWriteParams p, int64_t col_blocks) {
  const int64_t frame = static_cast<int64_t>(blockIdx.x) / col_blocks;  // (l, b, i)
  const int64_t col = (static_cast<int64_t>(blockIdx.x) % col_blocks) * kThreads + threadIdx.x;  // h * D + d
  if (col >= p.H * p.D) return;
  const int64_t i = frame % p.n, b = frame / p.n % p.B, l = frame / (p.n * p.B);
  const int64_t page = p.pages[b * p.page_stride[0] + i * p.page_stride[1]];
  if (page < 0 || page >= p.P) return;
  const int64_t h = col / p.D, d = col % p.D;
  float sum = 0.f;
  for (int kv = 0; kv < 2; ++kv) {
    const int64_t* ps = p.pool_stride[kv];
    const int64_t* ss = p.src_stride[kv];
    T* dst = static_cast<T*>(p.pool[kv]) + l * ps[0] + b * ps[1] + page * ps[2] + h * ps[4] + d * ps[5];
    const T* src = static_cast<const T*>(p.src[kv]) + l * ss[0] + b * ss[1] + i * p.F * ss[2] + h * ss[3] + d * ss[4];
    for (int64_t t = 0; t < p.F; ++t) {
      const T x = src[t * ss[2]];
      dst[t * ps[3]] = x;
      if (kv == 0) sum += to_float(x);
    }
  }
  p.k_mean[l * p.mean_stride[0] + b * p.mean_stride[1] + page * p.mean_stride[2] + h * p.mean_stride[3] +
           d * p.mean_stride[4]] = sum / static_cast<float>(p.F);
}

}  // namespace

LaunchStatus frame_write_launch(const FrameWriteParams& p, DType dtype, void* stream) {
  const int64_t frames = p.NL * p.B * p.n, cols = p.H * p.D;
  if (frames == 0 || cols == 0) return static_cast<int>(cudaSuccess);
  const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
  const int64_t blocks = frames * col_blocks;
  if (blocks > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  STREAMKERN_DISPATCH_FLOAT(dtype, T,
      frame_write_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          p, col_blocks));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace streamkern
