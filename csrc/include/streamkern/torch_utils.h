// Torch-side glue shared by the C++ ops: dtype mapping for the torch-free CUDA launchers, and the checks that
// C++ entry points repeat (the Python layer has already validated every argument with a clear message; these
// guard direct calls of torch.ops.streamkern_C.*).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "streamkern/common.h"

namespace streamkern {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kByte: return DType::kUInt8;
    case at::kLong: return DType::kInt64;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "streamkern: unsupported dtype ", t.scalar_type());
  }
}

}  // namespace streamkern

#define STREAMKERN_CHECK_LAUNCH(status) \
  TORCH_CHECK((status) == 0, "streamkern: CUDA launch failed with error code ", (status))
