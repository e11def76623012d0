// Torch-free types shared by the CUDA launchers (csrc/cuda/*.cu) and their torch bindings.
#pragma once
#include <cstdint>

// Marks helpers compiled for both host and device (plain inline in host-only translation units).
#if defined(__CUDACC__)
#define STREAMKERN_HD __host__ __device__ __forceinline__
#else
#define STREAMKERN_HD inline
#endif

namespace streamkern {

// Element type of a tensor argument, passed from the torch binding to a torch-free launcher.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3, kInt64 = 4, kFloat64 = 5 };

// Launchers return the CUDA error of their launch (cudaSuccess == 0) as an int so that the headers that
// declare them need no CUDA include; bindings turn non-zero into an exception (STREAMKERN_CHECK_LAUNCH).
using LaunchStatus = int;

}  // namespace streamkern
