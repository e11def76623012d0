// ring_write_ and ring_write_at_ on the CPU: the token-row copy of csrc/cpu/token_copy.cpp with the parameters
// and checks of streamkern/ops/ring_write.h.
#include <torch/library.h>

#include "streamkern/ops/ring_write.h"

namespace streamkern {
namespace {

void ring_write_cpu(at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& k_new, const at::Tensor& v_new,
                    int64_t start, int64_t sink) {
  token_copy_cpu(ring_write_params(cache_k, cache_v, k_new, v_new, start, sink), cache_k.element_size());
}

void ring_write_at_cpu(at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& k_new, const at::Tensor& v_new,
                       const at::Tensor& start, int64_t sink) {
  token_copy_cpu(ring_write_params(cache_k, cache_v, k_new, v_new, start, sink), cache_k.element_size());
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kRingWriteSchema);
  m.def(streamkern::kRingWriteAtSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) {
  m.impl("ring_write_", &streamkern::ring_write_cpu);
  m.impl("ring_write_at_", &streamkern::ring_write_at_cpu);
}
