// pose_topk (docs/contract.md §4.2, seed 004) on the CPU; schema and checks in streamkern/ops/pose_topk.h.
//
//   sim[i] = exp(-‖poses[i, :3] − current[:3]‖₂ / scale)    (float64, rounded to float: rank_keys.h)
//   the k smallest pose_key(valid[i], sim[i], i) by a partial sort: descending sim, ties to the lowest index,
//   NaN below numbers, invalid last -> idx -1 / sim 0; k may exceed N (the rows past N are padding too).
//
// One pass over the first three columns of poses (any strides, fp32/fp16/bf16 read natively), then
// std::partial_sort of N packed keys.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "streamkern/ops/pose_topk.h"
#include "streamkern/rank_keys.h"

namespace streamkern {
namespace {

void pose_topk_cpu(at::Tensor idx, at::Tensor sim, const at::Tensor& poses, const at::Tensor& valid,
                   const at::Tensor& current, double scale) {
  const PoseTopkParams pp = pose_topk_params(idx, sim, poses, valid, current, scale);
  const int64_t N = pp.N, k = pp.k, p0 = pp.p0, p1 = pp.p1, sc = pp.s_c, sv = pp.s_v;
  const bool* ok = pp.valid;

  std::vector<float> sims(N);
  std::vector<uint64_t> keys(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, poses.scalar_type(), "pose_topk_cpu", [&] {
    const scalar_t* p = poses.data_ptr<scalar_t>();
    const scalar_t* c = current.data_ptr<scalar_t>();
    const double cx = static_cast<double>(c[0]), cy = static_cast<double>(c[sc]), cz = static_cast<double>(c[2 * sc]);
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t* row = p + i * p0;
      sims[i] = pose_similarity(static_cast<double>(row[0]) - cx, static_cast<double>(row[p1]) - cy,
                                static_cast<double>(row[2 * p1]) - cz, scale);
      keys[i] = pose_key(ok[i * sv], sims[i], static_cast<int>(i));
    }
  });
  const int64_t ranked = std::min(k, N);  // k > N: the rest is padding
  std::partial_sort(keys.begin(), keys.begin() + ranked, keys.end());
  for (int64_t r = 0; r < k; ++r) {
    const bool chosen = r < ranked && pose_key_chosen(keys[r]);
    pp.idx[r] = chosen ? pose_key_index(keys[r]) : -1;
    pp.sim[r] = chosen ? sims[pose_key_index(keys[r])] : 0.0f;
  }
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kPoseTopkSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("pose_topk_", &streamkern::pose_topk_cpu); }
