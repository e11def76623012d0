// ring_write_ and ring_write_at_ (docs/contract.md §4.2, the KV ring under KVRing.append): the op schemas and the
// token-copy parameters (streamkern/token_copy.h) with the checks their C++ entry points repeat for direct calls,
// shared by the CPU op (csrc/cpu/ring_write.cpp) and the CUDA binding (csrc/cuda/ring_write_binding.cpp).
//
// New token i of k_new/v_new [NL, B, T, H, D] goes to slot start + i of cache_k/cache_v [NL, B, S, H, D], or to
// start + i - window once that reaches S = sink + window.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "streamkern/token_copy_torch.h"

namespace streamkern {

inline constexpr const char* kRingWriteSchema =
    "ring_write_(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k_new, Tensor v_new, int start, int sink) -> ()";
// The same copy with the start slot read on the device (an int64 [] tensor): capture-safe for CUDA graphs.
inline constexpr const char* kRingWriteAtSchema =
    "ring_write_at_(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k_new, Tensor v_new, Tensor start, "
    "int sink) -> ()";

inline TokenCopyParams ring_write_params(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k_new,
                                         const at::Tensor& v_new, int64_t start, int64_t sink) {
  TORCH_CHECK_VALUE(cache_k.dim() == 5 && k_new.dim() == 5, "cache_k, k_new: expected 5-d tensors");
  const int64_t S = cache_k.size(2);
  TORCH_CHECK_VALUE(0 <= sink && sink < S, "sink: expected an int in [0, ", S - 1, "], got ", sink);
  TORCH_CHECK_VALUE(0 <= start && start < S, "start: expected an int in [0, ", S - 1, "], got ", start);
  TORCH_CHECK_VALUE(k_new.size(2) <= S - sink, "k_new: expected at most window=", S - sink, " new tokens, got ",
                    k_new.size(2));
  TokenCopyParams p = token_copy_params(cache_k, cache_v, k_new, v_new, k_new.size(2));
  p.dst_base.offset = start;
  p.wrap_at = S;
  p.wrap_by = S - sink;
  return p;
}

// ring_write_at_: the start slot is an int64 [] tensor read on the device (a row is skipped when it is out of range).
inline TokenCopyParams ring_write_params(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k_new,
                                         const at::Tensor& v_new, const at::Tensor& start, int64_t sink) {
  TORCH_CHECK_VALUE(start.dim() == 0 && start.scalar_type() == at::kLong && start.device() == cache_k.device(),
                    "start: expected an int64 [] tensor on the caches' device");
  TokenCopyParams p = ring_write_params(cache_k, cache_v, k_new, v_new, int64_t{0}, sink);
  p.dst_base = token_index(start, p.B, cache_k.size(2), 1);  // read by the kernel; out of [0, S): no row written
  return p;
}

}  // namespace streamkern
