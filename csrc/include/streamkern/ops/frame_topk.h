// frame_topk_ (docs/contract.md §4.5, MemFlow's sparse memory activation): the torch-free parameters shared by the CPU
// kernel (csrc/cpu/frame_topk.cpp) and the CUDA launcher (csrc/cuda/frame_topk.cu), the ranking rule both apply,
// and, outside nvcc, the op schema, the checks its C++ entry points repeat for direct calls and the parameters
// read off the tensors.
//
//   qbar[b, h]     = mean over Lq of q[b, :, h, :]
//   score[b, h, c] = qbar[b, h] · k_mean[b, candidates[b, c], h]      (per_head = false: mean over h)
// out[b, (h,) r] = the page id of the r-th best valid candidate (descending score, NaN above every number as in a
// descending sort, ties to the lower candidate position), -1 once the valid candidates run out. A candidate is
// valid when it lies in [0, P).
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

struct FrameTopkParams {
  const void* q = nullptr;                 // [B, Lq, H, D]
  const float* k_mean = nullptr;           // [B, P, H, D]
  const int64_t* candidates = nullptr;     // [B, C]
  int64_t* out = nullptr;                  // [B, H, k] (per_head) or [B, k]
  int64_t B = 0, Lq = 0, H = 0, D = 0, P = 0, C = 0, k = 0;
  bool per_head = true;
  int64_t q_stride[4] = {}, mean_stride[4] = {}, cand_stride[2] = {};
  int64_t out_stride[3] = {};  // b, h (0 when not per head), rank
};

// Whether candidate (score a, position i) ranks before (score b, position j); both valid.
STREAMKERN_HD bool frame_topk_before(float a, int64_t i, float b, int64_t j) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || i < j);
  return a > b || (a == b && i < j);
}

// One block per (b, h) row of the output (per_head) or per b: qbar and the C scores in shared memory (float32
// sums), each valid candidate's rank counted against the others, the first k ranks written.
LaunchStatus frame_topk_launch(const FrameTopkParams& p, DType dtype, void* stream);

}  // namespace streamkern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace streamkern {

inline constexpr const char* kFrameTopkSchema =
    "frame_topk_(Tensor q, Tensor k_mean, Tensor candidates, int k, bool per_head, Tensor(a!) out) -> ()";

// q [B, Lq, H, D] float32/float16/bfloat16; k_mean float32 [B, P, H, D]; candidates int64 [B, C]; k >= 0;
// out int64 [B, H, k] (per_head) or [B, k]; one device; any strides.
inline FrameTopkParams frame_topk_params(const at::Tensor& q, const at::Tensor& k_mean, const at::Tensor& candidates,
                                         int64_t k, bool per_head, at::Tensor& out) {
  constexpr const char* op = "frame_topk_";
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, Lq, H, D], got ", q.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(k_mean.dim() == 4 && k_mean.size(0) == B && k_mean.size(2) == H && k_mean.size(3) == D, op,
                    ": k_mean must be [B=", B, ", P, H=", H, ", D=", D, "], got ", k_mean.sizes());
  TORCH_CHECK_TYPE(k_mean.scalar_type() == at::kFloat, op, ": k_mean must be float32, got ", k_mean.scalar_type());
  TORCH_CHECK_VALUE(candidates.dim() == 2 && candidates.size(0) == B, op, ": candidates must be [B=", B,
                    ", C], got ", candidates.sizes());
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kLong, op, ": candidates must be int64, got ",
                   candidates.scalar_type());
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(per_head ? (out.dim() == 3 && out.size(0) == B && out.size(1) == H && out.size(2) == k)
                             : (out.dim() == 2 && out.size(0) == B && out.size(1) == k),
                    op, ": out must be [B, H, k] (per_head) or [B, k] with B=", B, ", H=", H, ", k=", k, ", got ",
                    out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kLong, op, ": out must be int64, got ", out.scalar_type());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k_mean, &candidates, &out})
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": every tensor must be on q's device ", q.device());
  FrameTopkParams p;
  p.q = q.data_ptr();
  p.k_mean = k_mean.data_ptr<float>();
  p.candidates = candidates.data_ptr<int64_t>();
  p.out = out.data_ptr<int64_t>();
  p.B = B, p.Lq = q.size(1), p.H = H, p.D = D, p.P = k_mean.size(1), p.C = candidates.size(1), p.k = k;
  p.per_head = per_head;
  for (int d = 0; d < 4; ++d) p.q_stride[d] = q.stride(d), p.mean_stride[d] = k_mean.stride(d);
  p.cand_stride[0] = candidates.stride(0);
  p.cand_stride[1] = candidates.stride(1);
  p.out_stride[0] = out.stride(0);
  p.out_stride[1] = per_head ? out.stride(1) : 0;
  p.out_stride[2] = out.stride(per_head ? 2 : 1);
  return p;
}

}  // namespace streamkern
#endif  // !__CUDACC__
