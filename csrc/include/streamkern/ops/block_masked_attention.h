// block_masked_attention_ (docs/contract.md §4.4; CPU only, csrc/cpu/block_masked_attention.cpp): the op schema.
#pragma once

namespace streamkern {

inline constexpr const char* kBlockMaskedAttentionSchema =
    "block_masked_attention_(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor q_scale, Tensor k_scale, "
    "Tensor allow, bool self_attend, float sm_scale) -> ()";

}  // namespace streamkern
