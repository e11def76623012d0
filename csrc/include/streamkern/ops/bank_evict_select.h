// bank_evict_select_ (docs/contract.md §4.2): the torch-free parameters shared by the CPU kernel
// (csrc/cpu/bank_evict_select.cpp) and the CUDA launcher (csrc/cuda/bank_evict_select.cu), and, outside nvcc, the
// op schema and the parameters read off the tensors with the checks its C++ entry points repeat for direct calls.
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

struct BankEvictSelectParams {
  const void* scores;  // [M] float/half/bf16, stride s_s
  const bool* mask;    // [M, E], strides m0, m1
  const bool* valid;   // [M], stride s_v
  int64_t* out;        // []
  int M, E;            // 1 <= M <= 64, 0 <= E <= 256
  int64_t s_s, m0, m1, s_v;
};

// One block of 256 threads: coverage per entity (thread e), redundancy and packed key per slot (thread i),
// then the smallest key (rank_keys.h evict_key). Returns the launch's cudaError_t as int.
LaunchStatus bank_evict_select_launch(const BankEvictSelectParams& p, DType dtype, void* stream);

}  // namespace streamkern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace streamkern {

inline constexpr const char* kBankEvictSelectSchema =
    "bank_evict_select_(Tensor(a!) out, Tensor scores, Tensor entity_mask, Tensor valid) -> ()";

// scores [1 <= M <= 64] floating, bool entity_mask [M, E <= 256], bool valid [M], int64 out []; one device.
inline BankEvictSelectParams bank_evict_select_params(at::Tensor& out, const at::Tensor& scores,
                                                const at::Tensor& entity_mask, const at::Tensor& valid) {
  TORCH_CHECK(scores.dim() == 1 && entity_mask.dim() == 2 && valid.dim() == 1 && out.dim() == 0 &&
                  entity_mask.size(0) == scores.size(0) && valid.size(0) == scores.size(0) &&
                  entity_mask.scalar_type() == at::kBool && valid.scalar_type() == at::kBool &&
                  out.scalar_type() == at::kLong && scores.size(0) >= 1 && scores.size(0) <= 64 &&
                  entity_mask.size(1) <= 256,
              "bank_evict_select_: expected scores [M <= 64], bool entity_mask [M, E <= 256], bool valid [M], "
              "int64 out []");
  TORCH_CHECK(entity_mask.device() == scores.device() && valid.device() == scores.device() &&
                  out.device() == scores.device(),
              "bank_evict_select_: every tensor must be on scores' device");
  return {scores.data_ptr(), entity_mask.data_ptr<bool>(), valid.data_ptr<bool>(), out.data_ptr<int64_t>(),
          static_cast<int>(scores.size(0)), static_cast<int>(entity_mask.size(1)), scores.stride(0),
          entity_mask.stride(0), entity_mask.stride(1), valid.stride(0)};
}

}  // namespace streamkern
#endif  // !__CUDACC__
