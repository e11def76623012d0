// frame_write_ on the CPU (streamkern.frame_write, backend "cpu"; docs/contract.md §4.5): the op schema and its kernel.
// at::parallel_for over (layer, batch row, frame, group of heads): the F token rows of those heads are copied for
// k and v (one memcpy per row when its heads are contiguous in both) and the keys summed in float64 (in token
// order, as before) for k_mean (float32).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "streamkern/ops/frame_write.h"

namespace streamkern {
namespace {

// Sum of a run of n source elements into acc (float64), contiguous when stride == 1 (vectorised).
template <typename T>
void accumulate(double* acc, const T* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t e = 0; e < n; ++e) acc[e] += static_cast<double>(static_cast<float>(src[e]));
  } else {
    for (int64_t e = 0; e < n; ++e) acc[e] += static_cast<double>(static_cast<float>(src[e * stride]));
  }
}

template <typename T>
void frame_write_kernel(const FrameWriteParams& p) {
  // A task is (layer, row, frame, group of G adjacent heads): whole token rows (G = H) when there are enough
  // frames to keep every thread busy, else narrower groups.
  const int64_t frames = p.NL * p.B * p.n;
  const int64_t threads = at::get_num_threads();
  const int64_t split = std::min<int64_t>(p.H, (threads + frames - 1) / std::max<int64_t>(1, frames));
  const int64_t G = (p.H + split - 1) / split, groups = (p.H + G - 1) / G;
  at::parallel_for(0, frames * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(G * p.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % groups, f = task / groups;
      const int64_t i = f % p.n, b = f / p.n % p.B, l = f / (p.n * p.B);
      const int64_t page = p.pages[b * p.page_stride[0] + i * p.page_stride[1]];
      if (page < 0 || page >= p.P) continue;
      const int64_t h0 = g * G, nh = std::min(G, p.H - h0);
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int kv = 0; kv < 2; ++kv) {
        const int64_t* ps = p.pool_stride[kv];
        const int64_t* ss = p.src_stride[kv];
        T* dst = static_cast<T*>(p.pool[kv]) + l * ps[0] + b * ps[1] + page * ps[2] + h0 * ps[4];
        const T* src = static_cast<const T*>(p.src[kv]) + l * ss[0] + b * ss[1] + i * p.F * ss[2] + h0 * ss[3];
        // the nh heads of a token row as one run of nh·D elements, in the page and in the source
        const bool run = ps[5] == 1 && ss[4] == 1 && (nh == 1 || (ps[4] == p.D && ss[3] == p.D));
        for (int64_t t = 0; t < p.F; ++t) {
          T* drow = dst + t * ps[3];
          const T* srow = src + t * ss[2];
          if (run) {
            std::memcpy(drow, srow, static_cast<size_t>(nh * p.D) * sizeof(T));
            if (kv == 0) accumulate(sum.data(), srow, nh * p.D, 1);
            continue;
          }
          for (int64_t h = 0; h < nh; ++h) {
            for (int64_t d = 0; d < p.D; ++d) drow[h * ps[4] + d * ps[5]] = srow[h * ss[3] + d * ss[4]];
            if (kv == 0) accumulate(sum.data() + h * p.D, srow + h * ss[3], p.D, ss[4]);
          }
        }
      }
      float* mean = p.k_mean + l * p.mean_stride[0] + b * p.mean_stride[1] + page * p.mean_stride[2];
      for (int64_t h = 0; h < nh; ++h)
        for (int64_t d = 0; d < p.D; ++d)
          mean[(h0 + h) * p.mean_stride[3] + d * p.mean_stride[4]] =
              static_cast<float>(sum[h * p.D + d] / static_cast<double>(p.F));
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
