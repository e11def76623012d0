// bank_evict_select (docs/contract.md §4.2, seed 000 §2.3): the op schema and its CPU kernel.
//
//   coverage[e] = Σ_i mask[i, e];  redundant[i] = no entity e of slot i has coverage[e] < 2
//   out = argmin_i evict_key(valid[i], redundant[i], scores[i], i)     (rank_keys.h: the whole rule in one key)
//
// Plain loops over M <= 64 slots and E <= 256 entities: two passes over the mask, any strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "streamkern/ops/bank_evict_select.h"
#include "streamkern/rank_keys.h"

namespace streamkern {
namespace {

void bank_evict_select_cpu(at::Tensor out, const at::Tensor& scores, const at::Tensor& entity_mask,
                           const at::Tensor& valid) {
  const BankEvictSelectParams p = bank_evict_select_params(out, scores, entity_mask, valid);
  const int64_t M = p.M, E = p.E, m0 = p.m0, m1 = p.m1, sv = p.s_v, ss = p.s_s;
  const bool* mask = p.mask;
  const bool* ok = p.valid;

  std::vector<int32_t> coverage(E, 0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t e = 0; e < E; ++e) coverage[e] += mask[i * m0 + e * m1];

  uint64_t best = ~uint64_t{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "bank_evict_select_cpu", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M; ++i) {
      bool redundant = true;
      for (int64_t e = 0; e < E && redundant; ++e) redundant = !(mask[i * m0 + e * m1] && coverage[e] < 2);
      const uint64_t key = evict_key(ok[i * sv], redundant, static_cast<float>(s[i * ss]), static_cast<int>(i));
      best = key < best ? key : best;
    }
  });
  *p.out = evict_slot(best);
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kBankEvictSelectSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("bank_evict_select_", &streamkern::bank_evict_select_cpu); }
