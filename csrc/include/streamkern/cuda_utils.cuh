// Device-side helpers for the torch-free CUDA kernels: float conversion of the storage types and
// 16-byte vector loads/stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<uint8_t>(uint8_t x) { return static_cast<float>(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Number of T in one 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

// A 16-byte vector of T, loaded and stored with one instruction; `p` must be 16-byte aligned.
template <typename T> struct alignas(16) Vec16 {
  T v[kVec<T>];
  __device__ __forceinline__ static Vec16 load(const T* p) {
    Vec16 r;
    *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
    return r;
  }
  __device__ __forceinline__ void store(T* p) const {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(this);
  }
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Calls `f.template operator()<T>()` with T the storage type of `dtype` (float, __half, __nv_bfloat16).
#define STREAMKERN_DISPATCH_FLOAT(dtype, T, ...)                                  \
  switch (dtype) {                                                               \
    case ::streamkern::DType::kFloat32: { using T = float; __VA_ARGS__; break; }  \
    case ::streamkern::DType::kFloat16: { using T = __half; __VA_ARGS__; break; } \
    case ::streamkern::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return static_cast<int>(cudaErrorInvalidValue);                     \
  }

}  // namespace streamkern
