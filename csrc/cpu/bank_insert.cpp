// bank_insert_ on the CPU: the token-row copy of csrc/cpu/token_copy.cpp with the parameters and checks of
// streamkern/ops/bank_insert.h.
#include <torch/library.h>

#include "streamkern/ops/bank_insert.h"

namespace streamkern {

namespace {

void bank_insert_cpu(at::Tensor bank_k, at::Tensor bank_v, const at::Tensor& chunk_k, const at::Tensor& chunk_v,
                     const at::Tensor& frame_idx, const at::Tensor& slot, int64_t frame_seq_len) {
  const TokenCopyParams p = bank_insert_params(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, frame_seq_len);
  token_copy_cpu(p, bank_k.element_size());
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kBankInsertSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("bank_insert_", &streamkern::bank_insert_cpu); }
