// bank_insert_ (docs/contract.md §4.2, the copy under MemoryBank.insert): the op schema and the token-copy parameters
// (streamkern/token_copy.h) with the checks its C++ entry points repeat for direct calls, shared by the CPU op
// (csrc/cpu/bank_insert.cpp) and the CUDA binding (csrc/cuda/bank_insert_binding.cpp).
//
// bank[l, b, slot[b]·fsl + t] = chunk[l, b, frame_idx[b]·fsl + t] for every layer, k and v, t in [0, fsl); the
// indices are read in the kernel (rows with an out-of-range index are skipped; the Python layer raises for them on
// CPU before calling).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "streamkern/token_copy_torch.h"

namespace streamkern {

inline constexpr const char* kBankInsertSchema =
    "bank_insert_(Tensor(a!) bank_k, Tensor(b!) bank_v, Tensor chunk_k, Tensor chunk_v, Tensor frame_idx, "
    "Tensor slot, int frame_seq_len) -> ()";

inline TokenCopyParams bank_insert_params(at::Tensor& bank_k, at::Tensor& bank_v, const at::Tensor& chunk_k,
                                          const at::Tensor& chunk_v, const at::Tensor& frame_idx,
                                          const at::Tensor& slot,
                                          int64_t frame_seq_len) {
  TORCH_CHECK_VALUE(frame_seq_len >= 1 && bank_k.size(2) % frame_seq_len == 0 &&
                        chunk_k.size(2) % frame_seq_len == 0,
                    "frame_seq_len: expected a divisor of the bank and chunk token counts, got ", frame_seq_len);
  TORCH_CHECK_VALUE(frame_idx.device() == bank_k.device() && slot.device() == bank_k.device(),
                    "frame_idx, slot: expected tensors on the bank's device");
  TokenCopyParams p = token_copy_params(bank_k, bank_v, chunk_k, chunk_v, frame_seq_len);
  p.src_base = token_index(frame_idx, p.B, chunk_k.size(2) / frame_seq_len, frame_seq_len);
  p.dst_base = token_index(slot, p.B, bank_k.size(2) / frame_seq_len, frame_seq_len);
  return p;
}

}  // namespace streamkern
