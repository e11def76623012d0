// frame_write_ (docs/contract.md §4.5, the kernel under FramePool.write): the torch-free parameters shared by the CPU
// kernel (csrc/cpu/frame_write.cpp) and the CUDA launcher (csrc/cuda/frame_write.cu), and, outside nvcc, the op
// schema, the checks its C++ entry points repeat for direct calls and the parameters read off the tensors.
//
// Frame i of batch row b (tokens [i·F, (i+1)·F) of k_new/v_new[l, b]) goes to page pages[b, i] of every layer l,
// k and v; k_mean[l, b, page] becomes the float32 mean of its F keys. Ids outside [0, P) are skipped: nothing of
// that frame is read or written (the Python layer has already raised for them on "torch"/"cpu").
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

struct FrameWriteParams {
  void* pool[2] = {nullptr, nullptr};       // k, v pages [NL, B, P, F, H, D]
  float* k_mean = nullptr;                  // [NL, B, P, H, D]
  const void* src[2] = {nullptr, nullptr};  // k_new, v_new [NL, B, n·F, H, D]
  const int64_t* pages = nullptr;           // [B, n]
  int64_t NL = 0, B = 0, P = 0, F = 0, H = 0, D = 0, n = 0;
  int64_t pool_stride[2][6] = {};  // element strides, any (int64 offsets throughout)
  int64_t mean_stride[5] = {};
  int64_t src_stride[2][5] = {};
  int64_t page_stride[2] = {};
};

// One block per (frame, group of columns of the [H, D] rows: 16 16-byte vectors when the rows are contiguous and
// aligned, else 32 elements), the block's other threads token lanes: F tokens copied for k and v, the keys summed in
// float32 per lane, the lanes' sums added in a fixed order (deterministic) into the mean.
LaunchStatus frame_write_launch(const FrameWriteParams& p, DType dtype, void* stream);

}  // namespace streamkern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace streamkern {

inline constexpr const char* kFrameWriteSchema =
    "frame_write_(Tensor(a!) pool_k, Tensor(b!) pool_v, Tensor(c!) k_mean, Tensor k_new, Tensor v_new, "
    "Tensor pages) -> ()";

// pool_k/pool_v [NL, B, P, F, H, D] of one dtype (float32/float16/bfloat16) shared with k_new/v_new
// [NL, B, n·F, H, D]; k_mean float32 [NL, B, P, H, D]; pages int64 [B, n]; one device; any strides.
inline FrameWriteParams frame_write_params(at::Tensor& pool_k, at::Tensor& pool_v, at::Tensor& k_mean,
                                           const at::Tensor& k_new, const at::Tensor& v_new,
                                           const at::Tensor& pages) {
  constexpr const char* op = "frame_write_";
  TORCH_CHECK_VALUE(pool_k.dim() == 6, op, ": pool_k must be [NL, B, P, F, H, D], got ", pool_k.sizes());
  TORCH_CHECK_VALUE(pool_v.sizes() == pool_k.sizes(), op, ": pool_v must match pool_k ", pool_k.sizes(), ", got ",
                    pool_v.sizes());
  const int64_t NL = pool_k.size(0), B = pool_k.size(1), P = pool_k.size(2), F = pool_k.size(3),
                H = pool_k.size(4), D = pool_k.size(5);
  TORCH_CHECK_TYPE(pool_k.scalar_type() == at::kFloat || pool_k.scalar_type() == at::kHalf ||
                       pool_k.scalar_type() == at::kBFloat16,
                   op, ": pool_k must be float32, float16 or bfloat16, got ", pool_k.scalar_type());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&pool_v, &k_new, &v_new})
    TORCH_CHECK_TYPE(t->scalar_type() == pool_k.scalar_type(), op, ": pool_v, k_new and v_new must have pool_k's ",
                     "dtype ", pool_k.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(k_mean.dim() == 5 && k_mean.size(0) == NL && k_mean.size(1) == B && k_mean.size(2) == P &&
                        k_mean.size(3) == H && k_mean.size(4) == D,
                    op, ": k_mean must be [NL, B, P, H, D] = [", NL, ", ", B, ", ", P, ", ", H, ", ", D, "], got ",
                    k_mean.sizes());
  TORCH_CHECK_TYPE(k_mean.scalar_type() == at::kFloat, op, ": k_mean must be float32, got ", k_mean.scalar_type());
  TORCH_CHECK_VALUE(pages.dim() == 2 && pages.size(0) == B, op, ": pages must be [B=", B, ", n], got ",
                    pages.sizes());
  TORCH_CHECK_TYPE(pages.scalar_type() == at::kLong, op, ": pages must be int64, got ", pages.scalar_type());
  const int64_t n = pages.size(1);
  TORCH_CHECK_VALUE(k_new.dim() == 5 && k_new.size(0) == NL && k_new.size(1) == B && k_new.size(2) == n * F &&
                        k_new.size(3) == H && k_new.size(4) == D,
                    op, ": k_new must be [NL, B, n*F, H, D] = [", NL, ", ", B, ", ", n * F, ", ", H, ", ", D,
                    "], got ", k_new.sizes());
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), op, ": v_new must match k_new ", k_new.sizes(), ", got ",
                    v_new.sizes());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&pool_v, &k_mean, &k_new, &v_new, &pages})
    TORCH_CHECK_VALUE(t->device() == pool_k.device(), op, ": every tensor must be on pool_k's device ",
                      pool_k.device());
  FrameWriteParams p;
  p.pool[0] = pool_k.data_ptr();
  p.pool[1] = pool_v.data_ptr();
  p.k_mean = k_mean.data_ptr<float>();
  p.src[0] = k_new.data_ptr();
  p.src[1] = v_new.data_ptr();
  p.pages = pages.data_ptr<int64_t>();
  p.NL = NL, p.B = B, p.P = P, p.F = F, p.H = H, p.D = D, p.n = n;
  for (int d = 0; d < 6; ++d) p.pool_stride[0][d] = pool_k.stride(d), p.pool_stride[1][d] = pool_v.stride(d);
  for (int d = 0; d < 5; ++d) {
    p.mean_stride[d] = k_mean.stride(d);
    p.src_stride[0][d] = k_new.stride(d);
    p.src_stride[1][d] = v_new.stride(d);
  }
  p.page_stride[0] = pages.stride(0);
  p.page_stride[1] = pages.stride(1);
  return p;
}

}  // namespace streamkern
#endif  // !__CUDACC__
