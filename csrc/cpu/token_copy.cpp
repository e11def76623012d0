// The CPU token-row copy shared by ring_write_ and bank_insert_ (streamkern/token_copy_torch.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "streamkern/token_copy_torch.h"

namespace streamkern {
namespace {

template <typename E>
void copy_strided_row(const E* src, E* dst, int64_t H, int64_t D, int64_t sh, int64_t sd) {
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) dst[h * D + d] = src[h * sh + d * sd];
}

}  // namespace

void token_copy_cpu(const TokenCopyParams& p, int64_t element_size) {
  const int64_t rows = p.NL * p.B * p.T;
  const int64_t row_elems = p.H * p.D;
  if (rows == 0 || row_elems == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems * element_size));
  at::parallel_for(0, 2 * rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int kv = r >= rows ? 1 : 0;
      const RowOffsets o = row_offsets(p, kv, r - kv * rows);
      if (!o.valid) continue;
      const int64_t sh = p.src_stride[kv][3], sd = p.src_stride[kv][4];
      const char* src = static_cast<const char*>(p.src[kv]) + o.src * element_size;
      char* dst = static_cast<char*>(p.dst[kv]) + o.dst * element_size;
      if ((p.D == 1 || sd == 1) && (p.H == 1 || sh == p.D)) {
        std::memcpy(dst, src, static_cast<size_t>(row_elems * element_size));
      } else if (element_size == 4) {
        copy_strided_row(reinterpret_cast<const int32_t*>(src), reinterpret_cast<int32_t*>(dst), p.H, p.D, sh, sd);
      } else {
        copy_strided_row(reinterpret_cast<const int16_t*>(src), reinterpret_cast<int16_t*>(dst), p.H, p.D, sh, sd);
      }
    }
  });
}

}  // namespace streamkern
