// The CUDA token-row copy (ring_write_, bank_insert_): block-per-row, grid-stride, Vec16 copies when aligned.
#include <algorithm>

#include "streamkern/token_copy.cuh"
#include "streamkern/cuda_utils.cuh"

namespace streamkern {
namespace {

constexpr int kMaxThreads = 256;

template <typename T, bool kVector>
__global__ void __launch_bounds__(kMaxThreads) token_copy_kernel(const TokenCopyParams p) {
  const int64_t rows = p.NL * p.B * p.T;
  const int64_t row_elems = p.H * p.D;
  for (int64_t r = blockIdx.x; r < 2 * rows; r += gridDim.x) {
    const int kv = r >= rows ? 1 : 0;
    const RowOffsets o = row_offsets(p, kv, r - kv * rows);
    if (!o.valid) continue;  // uniform over the block
    const T* src = static_cast<const T*>(p.src[kv]) + o.src;
    T* dst = static_cast<T*>(p.dst[kv]) + o.dst;
    if constexpr (kVector) {
      const int64_t chunks = row_elems / kVec<T>;
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x)
        Vec16<T>::load(src + c * kVec<T>).store(dst + c * kVec<T>);
    } else {
      const int64_t sh = p.src_stride[kv][3], sd = p.src_stride[kv][4];
      for (int64_t e = threadIdx.x; e < row_elems; e += blockDim.x) {
        const int64_t h = e / p.D;
        dst[e] = src[h * sh + (e - h * p.D) * sd];
      }
    }
  }
}

bool aligned_ptr(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Every row start of both tensors 16-byte aligned and every source row one contiguous run.
bool vectorizable(const TokenCopyParams& p, int64_t vec) {
  if ((p.H * p.D) % vec != 0) return false;
  for (int kv = 0; kv < 2; ++kv) {
    const int64_t* ss = p.src_stride[kv];
    const int64_t* ds = p.dst_stride[kv];
    if (!aligned_ptr(p.src[kv]) || !aligned_ptr(p.dst[kv])) return false;
    if ((p.D > 1 && ss[4] != 1) || (p.H > 1 && ss[3] != p.D)) return false;
    for (int d = 0; d < 3; ++d)
      if (ss[d] % vec != 0 || ds[d] % vec != 0) return false;
  }
  return true;
}

template <typename T>
LaunchStatus launch_typed(const TokenCopyParams& p, cudaStream_t stream) {
  const int64_t rows = 2 * p.NL * p.B * p.T;
  if (rows == 0 || p.H * p.D == 0) return static_cast<int>(cudaSuccess);
  const bool vec = vectorizable(p, kVec<T>);
  const int64_t per_row = vec ? p.H * p.D / kVec<T> : p.H * p.D;
  const int threads = static_cast<int>(std::clamp<int64_t>((per_row + 31) / 32 * 32, 32, kMaxThreads));
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t resident = static_cast<int64_t>(sms) * (2048 / threads);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, resident));
  if (vec)
    token_copy_kernel<T, true><<<blocks, threads, 0, stream>>>(p);
  else
    token_copy_kernel<T, false><<<blocks, threads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

LaunchStatus token_copy_launch(const TokenCopyParams& p, DType dtype, cudaStream_t stream) {
  STREAMKERN_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(p, stream));
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace streamkern
