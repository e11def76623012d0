// frame_write CUDA kernel (see streamkern/ops/frame_write.h). A block owns one frame (l, b, i) and a group of
// `cols` neighbouring columns of the token rows: a column is 16 bytes (Vec16) when every [H, D] row is contiguous
// and 16-byte aligned, else one element. Its 256 threads are `cols` column lanes times 256 / cols token lanes: token
// lane r copies tokens r, r + rows, ... of its column, k and v (kUnroll tokens' loads issued before their stores, so
// that many loads are in flight), and sums its keys in float32. The block then adds the token lanes' partial sums of
// each column in a fixed order (deterministic, no atomics) and stores the mean. One launch; int64 offsets.
//
// Sizes, measured on an H200 (2026-12, MemFlow's chunk write: 30 layers x 3 frames of 1560 tokens, rows of 12 x 128
// bf16; the Triton kernel 75-81 % of copy bandwidth in the same runs): 16-byte columns go 16 to a block (256
// contiguous bytes of each row; 1080 blocks of 1.6 MB) with 2 tokens per lane in flight: 90.8 % of copy bandwidth;
// 8 and 32 columns gave 79 % and 83 %, 4 or 8 tokens in flight 89.7 % and 91.2 %, 512 threads 85.8 %. Element
// columns go 32 to a block (a warp reads a row's 32 neighbouring elements). At most 80 registers (3 blocks of 256
// threads per SM), no spills.
#include <climits>
#include <cstdint>
#include <type_traits>

#include "streamkern/cuda_utils.cuh"
#include "streamkern/ops/frame_write.h"

namespace streamkern {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;
constexpr int kVectorCols = 16, kElementCols = 32;

// One element with the interface of Vec16 (the column of a row that is not one contiguous, aligned run).
template <typename T> struct One {
  T v[1];
  __device__ __forceinline__ static One load(const T* p) { return {{*p}}; }
  __device__ __forceinline__ void store(T* p) const { *p = v[0]; }
};

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads, 3) frame_write_kernel(const FrameWriteParams p, int cols, int64_t groups) {
  using Column = std::conditional_t<kVector, Vec16<T>, One<T>>;
  constexpr int V = kVector ? kVec<T> : 1;
  __shared__ float partial[kThreads * V];
  const int64_t frame = blockIdx.x / groups, group = blockIdx.x % groups;
  const int64_t i = frame % p.n, b = frame / p.n % p.B, l = frame / (p.n * p.B);
  const int64_t page = p.pages[b * p.page_stride[0] + i * p.page_stride[1]];
  if (page < 0 || page >= p.P) return;  // the whole block: nothing of this frame is read or written
  const int lane = threadIdx.x % cols, row = threadIdx.x / cols, rows = kThreads / cols;
  const int64_t first = (group * cols + lane) * V;  // h * D + d of this thread's first element
  float sum[V] = {};
  if (first < p.H * p.D) {
    const T* src[2];
    T* dst[2];
    for (int kv = 0; kv < 2; ++kv) {
      const int64_t* ss = p.src_stride[kv];
      const int64_t* ps = p.pool_stride[kv];
      const int64_t h = first / p.D, d = first % p.D;
      src[kv] = static_cast<const T*>(p.src[kv]) + l * ss[0] + b * ss[1] + i * p.F * ss[2] + h * ss[3] + d * ss[4];
      dst[kv] = static_cast<T*>(p.pool[kv]) + l * ps[0] + b * ps[1] + page * ps[2] + h * ps[4] + d * ps[5];
    }
    const int64_t sk = p.src_stride[0][2], sv = p.src_stride[1][2], dk = p.pool_stride[0][3],
                  dv = p.pool_stride[1][3];
    for (int64_t t0 = row; t0 < p.F; t0 += static_cast<int64_t>(rows) * kUnroll) {
      Column k[kUnroll], v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t t = t0 + static_cast<int64_t>(u) * rows;
        if (t < p.F) {
          k[u] = Column::load(src[0] + t * sk);
          v[u] = Column::load(src[1] + t * sv);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t t = t0 + static_cast<int64_t>(u) * rows;
        if (t >= p.F) break;
        k[u].store(dst[0] + t * dk);
        v[u].store(dst[1] + t * dv);
#pragma unroll
        for (int j = 0; j < V; ++j) sum[j] += to_float(k[u].v[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) partial[threadIdx.x * V + j] = sum[j];  // [row][lane][j]
  __syncthreads();
  for (int o = threadIdx.x; o < cols * V; o += kThreads) {  // o = lane * V + j: one mean per thread
    float total = 0.f;
    for (int r = 0; r < rows; ++r) total += partial[r * cols * V + o];
    const int64_t e = group * cols * V + o;
    if (e < p.H * p.D) {
      const int64_t* ms = p.mean_stride;
      p.k_mean[l * ms[0] + b * ms[1] + page * ms[2] + e / p.D * ms[3] + e % p.D * ms[4]] =
          total / static_cast<float>(p.F);
    }
  }
}

bool aligned_ptr(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// 16-byte columns are valid when every [H, D] row of the four tensors is one contiguous run starting 16-byte
// aligned: H·D a multiple of the vector, rows contiguous, aligned bases and strides (of dims longer than 1).
template <typename T>
bool vectorizable(const FrameWriteParams& p) {
  constexpr int64_t vec = kVec<T>;
  if ((p.H * p.D) % vec != 0) return false;
  const int64_t pool_sizes[4] = {p.NL, p.B, p.P, p.F}, src_sizes[3] = {p.NL, p.B, p.n * p.F};
  for (int kv = 0; kv < 2; ++kv) {
    const int64_t* ps = p.pool_stride[kv];
    const int64_t* ss = p.src_stride[kv];
    if (!aligned_ptr(p.pool[kv]) || !aligned_ptr(p.src[kv])) return false;
    if ((p.D > 1 && (ps[5] != 1 || ss[4] != 1)) || (p.H > 1 && (ps[4] != p.D || ss[3] != p.D))) return false;
    for (int d = 0; d < 4; ++d)
      if (pool_sizes[d] > 1 && ps[d] % vec != 0) return false;
    for (int d = 0; d < 3; ++d)
      if (src_sizes[d] > 1 && ss[d] % vec != 0) return false;
  }
  return true;
}

template <typename T>
LaunchStatus launch_typed(const FrameWriteParams& p, cudaStream_t stream) {
  const bool vec = vectorizable<T>(p);
  const int64_t columns = vec ? p.H * p.D / kVec<T> : p.H * p.D;
  int cols = vec ? kVectorCols : kElementCols;  // or the smallest power of two covering a row's columns
  while (cols > 1 && cols / 2 >= columns) cols /= 2;
  const int64_t groups = (columns + cols - 1) / cols;
  const int64_t blocks = p.NL * p.B * p.n * groups;
  if (blocks > INT_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (vec)
    frame_write_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, cols, groups);
  else
    frame_write_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, cols, groups);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

LaunchStatus frame_write_launch(const FrameWriteParams& p, DType dtype, void* stream) {
  if (p.NL * p.B * p.n == 0 || p.H * p.D == 0) return static_cast<int>(cudaSuccess);
  STREAMKERN_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(p, static_cast<cudaStream_t>(stream)));
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace streamkern
