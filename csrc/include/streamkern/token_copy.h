// Token-row copy shared by ring_write and bank_insert (CPU and CUDA, torch-free, CUDA-free).
//
// Both ops copy whole tokens: for every layer l, batch row b and new token t in [0, T), the H*D values of
// src[kv][l, b, src_token] go to dst[kv][l, b, dst_token], for kv in {k, v}. The token indices are
//   src_token = src.base(b) + t
//   dst_token = dst.base(b) + t, minus wrap_by when it is >= wrap_at   (the ring's wrap to slot `sink`)
// where base(b) is either a constant `offset` or `index[b * stride] * scale` read from a device tensor; a row whose
// index is outside [0, limit) is skipped (never read or written out of bounds).
#pragma once
#include "streamkern/common.h"
#include <cstdint>

namespace streamkern {

struct TokenBase {
  const int64_t* index = nullptr;  // nullptr: the base is `offset` for every batch row
  int64_t stride = 0;              // element stride of `index` over the batch (0 broadcasts one value)
  int64_t limit = 0;               // valid index values are [0, limit)
  int64_t scale = 1;               // base = index * scale
  int64_t offset = 0;
};

struct TokenCopyParams {
  const void* src[2] = {nullptr, nullptr};  // k, v sources [NL, B, *, H, D]
  void* dst[2] = {nullptr, nullptr};        // k, v destinations [NL, B, *, H, D], [H, D] contiguous
  int64_t NL = 0, B = 0, T = 0, H = 0, D = 0;
  int64_t src_stride[2][5] = {};  // per kv: strides of l, b, token, h, d (elements)
  int64_t dst_stride[2][3] = {};  // per kv: strides of l, b, token (elements)
  TokenBase src_base, dst_base;
  int64_t wrap_at = INT64_MAX, wrap_by = 0;
};

struct RowOffsets {
  int64_t src, dst;  // element offsets of the token rows
  bool valid;
};

STREAMKERN_HD bool token_base(const TokenBase& tb, int64_t b, int64_t* base) {
  if (tb.index == nullptr) {
    *base = tb.offset;
    return true;
  }
  const int64_t i = tb.index[b * tb.stride];
  *base = i * tb.scale + tb.offset;
  return i >= 0 && i < tb.limit;
}

// Offsets of row `row` in [0, NL*B*T) (row = (l*B + b)*T + t) of tensor pair kv.
STREAMKERN_HD RowOffsets row_offsets(const TokenCopyParams& p, int kv, int64_t row) {
  const int64_t t = row % p.T;
  const int64_t lb = row / p.T;
  const int64_t b = lb % p.B;
  const int64_t l = lb / p.B;
  int64_t sb = 0, db = 0;
  const bool ok_src = token_base(p.src_base, b, &sb);
  const bool ok_dst = token_base(p.dst_base, b, &db);
  int64_t dt = db + t;
  if (dt >= p.wrap_at) dt -= p.wrap_by;
  const int64_t* ss = p.src_stride[kv];
  const int64_t* ds = p.dst_stride[kv];
  return {l * ss[0] + b * ss[1] + (sb + t) * ss[2], l * ds[0] + b * ds[1] + dt * ds[2], ok_src && ok_dst};
}

}  // namespace streamkern
