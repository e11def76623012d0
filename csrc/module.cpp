// The Python module streamkern._C. Ops live in TORCH_LIBRARY_FRAGMENT(streamkern_C, ...) blocks of the
// csrc/cpu/*.cpp files (schemas + CPU kernels) and TORCH_LIBRARY_IMPL(streamkern_C, CUDA, ...) blocks of
// csrc/cuda/*_binding.cpp; loading this module registers them all as torch.ops.streamkern_C.*.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "streamkern C++ CPU and CUDA kernels (ops under torch.ops.streamkern_C)";
  m.def("cuda_built", []() {
#ifdef STREAMKERN_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this extension.");
}
