// Torch-side glue of the token-row copy (token_copy.h) under ring_write_ and bank_insert_: fills TokenCopyParams
// from tensors (the op-specific parts are in streamkern/ops/ring_write.h and bank_insert.h), and the CPU copy
// (csrc/cpu/token_copy.cpp).
#pragma once
#include <ATen/ATen.h>

#include "streamkern/token_copy.h"

namespace streamkern {

// dst_k/dst_v [NL, B, *, H, D] with [H, D] contiguous; src_k/src_v [NL, B, *, H, D] any strides;
// T tokens per (layer, batch row). Bases and wrap are left for the caller.
inline TokenCopyParams token_copy_params(at::Tensor& dst_k, at::Tensor& dst_v, const at::Tensor& src_k,
                                         const at::Tensor& src_v, int64_t T) {
  TORCH_CHECK(dst_k.dim() == 5 && dst_v.dim() == 5 && src_k.dim() == 5 && src_v.dim() == 5,
              "streamkern: token copy expects 5-d tensors");
  TORCH_CHECK(dst_k.scalar_type() == src_k.scalar_type() && dst_v.scalar_type() == src_v.scalar_type() &&
                  dst_k.scalar_type() == dst_v.scalar_type(),
              "streamkern: token copy expects one dtype");
  TORCH_CHECK(dst_v.device() == dst_k.device() && src_k.device() == dst_k.device() &&
                  src_v.device() == dst_k.device(),
              "streamkern: token copy expects all tensors on one device");
  TokenCopyParams p;
  p.NL = dst_k.size(0);
  p.B = dst_k.size(1);
  p.T = T;
  p.H = dst_k.size(3);
  p.D = dst_k.size(4);
  const at::Tensor* dst[2] = {&dst_k, &dst_v};
  const at::Tensor* src[2] = {&src_k, &src_v};
  for (int kv = 0; kv < 2; ++kv) {
    TORCH_CHECK(dst[kv]->sizes() == dst_k.sizes() && src[kv]->sizes() == src_k.sizes(),
                "streamkern: k and v shapes differ");
    TORCH_CHECK(src[kv]->size(0) == p.NL && src[kv]->size(1) == p.B && src[kv]->size(3) == p.H &&
                    src[kv]->size(4) == p.D,
                "streamkern: source and destination differ in NL, B, H or D");
    TORCH_CHECK((p.D <= 1 || dst[kv]->stride(4) == 1) && (p.H <= 1 || dst[kv]->stride(3) == p.D),
                "streamkern: destination [H, D] must be contiguous");
    p.dst[kv] = dst[kv]->data_ptr();
    p.src[kv] = src[kv]->data_ptr();
    for (int d = 0; d < 3; ++d) p.dst_stride[kv][d] = dst[kv]->stride(d);
    for (int d = 0; d < 5; ++d) p.src_stride[kv][d] = src[kv]->stride(d);
  }
  return p;
}

// Index tensor [B] or [] (int64, on the tensors' device) as a TokenBase.
inline TokenBase token_index(const at::Tensor& index, int64_t batch, int64_t limit, int64_t scale) {
  TORCH_CHECK(index.scalar_type() == at::kLong && (index.dim() == 0 || (index.dim() == 1 && index.size(0) == batch)),
              "streamkern: index must be int64 [B] or []");
  TokenBase tb;
  tb.index = index.data_ptr<int64_t>();
  tb.stride = index.dim() == 1 ? index.stride(0) : 0;
  tb.limit = limit;
  tb.scale = scale;
  return tb;
}

// The CPU copy: at::parallel_for over the 2*NL*B*T token rows, memcpy when the source row is contiguous.
void token_copy_cpu(const TokenCopyParams& p, int64_t element_size);

}  // namespace streamkern
