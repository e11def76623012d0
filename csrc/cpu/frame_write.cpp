// frame_write_ on the CPU (streamkern.frame_write, backend "cpu"; DESIGN.md §4.5): the op schema and its kernel.
// at::parallel_for over (layer, batch row, frame, head): the F token rows of that head are copied for k and v
// (memcpy of D elements when both rows are contiguous) and the keys summed in float64 for k_mean (float32).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "streamkern/ops/frame_write.h"

namespace streamkern {
namespace {

template <typename T>
void frame_write_kernel(const FrameWriteParams& p) {
  const int64_t tasks = p.NL * p.B * p.n * p.H;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.F * p.D));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(p.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % p.H, i = task / p.H % p.n, b = task / (p.H * p.n) % p.B, l = task / (p.H * p.n * p.B);
      const int64_t page = p.pages[b * p.page_stride[0] + i * p.page_stride[1]];
      if (page < 0 || page >= p.P) continue;
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int kv = 0; kv < 2; ++kv) {
        const int64_t* ps = p.pool_stride[kv];
        const int64_t* ss = p.src_stride[kv];
        T* dst = static_cast<T*>(p.pool[kv]) + l * ps[0] + b * ps[1] + page * ps[2] + h * ps[4];
        const T* src = static_cast<const T*>(p.src[kv]) + l * ss[0] + b * ss[1] + i * p.F * ss[2] + h * ss[3];
        const bool rows_contiguous = p.D == 1 || (ps[5] == 1 && ss[4] == 1);
        for (int64_t t = 0; t < p.F; ++t) {
          T* drow = dst + t * ps[3];
          const T* srow = src + t * ss[2];
          if (rows_contiguous) {
            std::memcpy(drow, srow, static_cast<size_t>(p.D) * sizeof(T));
          } else {
            for (int64_t d = 0; d < p.D; ++d) drow[d * ps[5]] = srow[d * ss[4]];
          }
          if (kv == 0)
            for (int64_t d = 0; d < p.D; ++d) sum[d] += static_cast<double>(static_cast<float>(srow[d * ss[4]]));
        }
      }
      float* mean = p.k_mean + l * p.mean_stride[0] + b * p.mean_stride[1] + page * p.mean_stride[2] +
                    h * p.mean_stride[3];
      for (int64_t d = 0; d < p.D; ++d)
        mean[d * p.mean_stride[4]] = static_cast<float>(sum[d] / static_cast<double>(p.F));
    }
  });
}

void frame_write_cpu(at::Tensor pool_k, at::Tensor pool_v, at::Tensor k_mean, const at::Tensor& k_new,
                     const at::Tensor& v_new, const at::Tensor& pages) {
  const FrameWriteParams p = frame_write_params(pool_k, pool_v, k_mean, k_new, v_new, pages);
  TORCH_CHECK_VALUE(pool_k.is_cpu(), "frame_write_: the cpu kernel needs CPU tensors, got ", pool_k.device());
  switch (pool_k.scalar_type()) {
    case at::kFloat: frame_write_kernel<float>(p); break;
    case at::kHalf: frame_write_kernel<at::Half>(p); break;
    default: frame_write_kernel<at::BFloat16>(p); break;
  }
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) { m.def(streamkern::kFrameWriteSchema); }

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("frame_write_", &streamkern::frame_write_cpu); }
