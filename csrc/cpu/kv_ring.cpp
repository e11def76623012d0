// ring_write_: the op schema and its CPU kernel; also the CPU token-row copy shared with bank_insert_.
// New token i goes to slot start + i, or start + i - window once that reaches S = sink + window.
#include <ATen/Parallel.h>
#include <torch/library.h>

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

TokenCopyParams ring_write_params(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k_new,
                                  const at::Tensor& v_new, int64_t start, int64_t sink) {
  TORCH_CHECK_VALUE(cache_k.dim() == 5 && k_new.dim() == 5, "cache_k, k_new: expected 5-d tensors");
  const int64_t S = cache_k.size(2);
  TORCH_CHECK_VALUE(0 <= sink && sink < S, "sink: expected an int in [0, ", S - 1, "], got ", sink);
  TORCH_CHECK_VALUE(0 <= start && start < S, "start: expected an int in [0, ", S - 1, "], got ", start);
  TORCH_CHECK_VALUE(k_new.size(2) <= S - sink, "k_new: expected at most window=", S - sink, " new tokens, got ",
                    k_new.size(2));
  TokenCopyParams p = token_copy_params(cache_k, cache_v, k_new, v_new, k_new.size(2));
  p.dst_base.offset = start;
  p.wrap_at = S;
  p.wrap_by = S - sink;
  return p;
}

TokenCopyParams ring_write_params(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k_new,
                                  const at::Tensor& v_new, const at::Tensor& start, int64_t sink) {
  TORCH_CHECK_VALUE(start.dim() == 0 && start.scalar_type() == at::kLong && start.device() == cache_k.device(),
                    "start: expected an int64 [] tensor on the caches' device");
  TokenCopyParams p = ring_write_params(cache_k, cache_v, k_new, v_new, int64_t{0}, sink);
  p.dst_base = token_index(start, p.B, cache_k.size(2), 1);  // read by the kernel; out of [0, S): no row written
  return p;
}

namespace {

void ring_write_cpu(at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& k_new, const at::Tensor& v_new,
                    int64_t start, int64_t sink) {
  token_copy_cpu(ring_write_params(cache_k, cache_v, k_new, v_new, start, sink), cache_k.element_size());
}

void ring_write_at_cpu(at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& k_new, const at::Tensor& v_new,
                       const at::Tensor& start, int64_t sink) {
  token_copy_cpu(ring_write_params(cache_k, cache_v, k_new, v_new, start, sink), cache_k.element_size());
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def("ring_write_(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k_new, Tensor v_new, int start, int sink) -> ()");
  // The same copy with the start slot read on the device (an int64 [] tensor): capture-safe for CUDA graphs.
  m.def("ring_write_at_(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k_new, Tensor v_new, Tensor start, "
        "int sink) -> ()");
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) {
  m.impl("ring_write_", &streamkern::ring_write_cpu);
  m.impl("ring_write_at_", &streamkern::ring_write_at_cpu);
}
