// bank_evict_select on CUDA (DESIGN.md §4.2): torch-free parameters and launcher.
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

struct BankEvictParams {
  const void* scores;  // [M] float/half/bf16, stride s_s
  const bool* mask;    // [M, E], strides m0, m1
  const bool* valid;   // [M], stride s_v
  int64_t* out;        // []
  int M, E;            // 1 <= M <= 64, 0 <= E <= 256
  int64_t s_s, m0, m1, s_v;
};

// One block of 256 threads: coverage per entity (thread e), redundancy and packed key per slot (thread i),
// then the smallest key (rank_keys.h evict_key). Returns the launch's cudaError_t as int.
LaunchStatus bank_evict_launch(const BankEvictParams& p, DType dtype, void* stream);

}  // namespace streamkern
