// frame_topk_ on the CPU (streamkern.frame_topk, backend "cpu"; docs/contract.md §4.5): the op schema and its kernel.
// qbar of every head (float64 sums of q read natively, any strides; parallel over its columns), then
// at::parallel_for over batch rows: the C scores in float64 rounded to float32 and a stable partial sort of the
// valid candidates by frame_topk_before.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "streamkern/ops/frame_topk.h"

namespace streamkern {
namespace {

// qbar [B, H·D] (float64 sums of q over Lq in token order, rounded through float32): at::parallel_for over the
// B·H·D columns, each range reading its columns of every token row (a contiguous run per head when D is).
template <typename T>
std::vector<double> mean_queries(const FrameTopkParams& p) {
  const int64_t HD = p.H * p.D;
  std::vector<double> qbar(p.B * HD, 0.0);
  at::parallel_for(0, p.B * HD, 64, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end;) {
      const int64_t b = start / HD, c0 = start % HD, c1 = std::min(HD, c0 + (end - start));
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
      double* acc = qbar.data() + b * HD;
      for (int64_t i = 0; i < p.Lq; ++i) {
        const T* row = q + i * p.q_stride[1];
        for (int64_t c = c0; c < c1;) {
          const int64_t h = c / p.D, d0 = c % p.D, d1 = std::min(p.D, d0 + (c1 - c));
          const T* x = row + h * p.q_stride[2];
          double* a = acc + h * p.D;
          if (p.q_stride[3] == 1) {
            for (int64_t d = d0; d < d1; ++d) a[d] += static_cast<float>(x[d]);
          } else {
            for (int64_t d = d0; d < d1; ++d) a[d] += static_cast<float>(x[d * p.q_stride[3]]);
          }
          c += d1 - d0;
        }
      }
      for (int64_t c = c0; c < c1; ++c)
        acc[c] = static_cast<double>(static_cast<float>(acc[c] / static_cast<double>(p.Lq)));
      start += c1 - c0;
    }
  });
  return qbar;
}

// Scores [H or 1, C] of batch row b from its qbar (float32; invalid candidates get 0 and are never ranked).
void row_scores(const FrameTopkParams& p, int64_t b, const double* qbar, std::vector<float>& score) {
  for (int64_t c = 0; c < p.C; ++c) {
    const int64_t id = p.candidates[b * p.cand_stride[0] + c * p.cand_stride[1]];
    const bool valid = id >= 0 && id < p.P;
    double mean_over_h = 0.0;
    for (int64_t h = 0; h < p.H; ++h) {
      double dot = 0.0;
      if (valid) {
        const float* km = p.k_mean + b * p.mean_stride[0] + id * p.mean_stride[1] + h * p.mean_stride[2];
        for (int64_t d = 0; d < p.D; ++d) dot += qbar[h * p.D + d] * static_cast<double>(km[d * p.mean_stride[3]]);
      }
      if (p.per_head) score[h * p.C + c] = static_cast<float>(dot);
      mean_over_h += dot;
    }
    if (!p.per_head) score[c] = static_cast<float>(mean_over_h / static_cast<double>(p.H));
  }
}

template <typename T>
void frame_topk_kernel(const FrameTopkParams& p) {
  const std::vector<double> qbar = mean_queries<T>(p);
  at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score((p.per_head ? p.H : 1) * p.C);
    std::vector<int64_t> order;
    for (int64_t b = begin; b < end; ++b) {
      row_scores(p, b, qbar.data() + b * p.H * p.D, score);
      for (int64_t h = 0; h < (p.per_head ? p.H : 1); ++h) {
        const float* s = score.data() + h * p.C;
        order.clear();
        for (int64_t c = 0; c < p.C; ++c) {
          const int64_t id = p.candidates[b * p.cand_stride[0] + c * p.cand_stride[1]];
          if (id >= 0 && id < p.P) order.push_back(c);
        }
        const int64_t kept = std::min<int64_t>(p.k, static_cast<int64_t>(order.size()));
        std::partial_sort(order.begin(), order.begin() + kept, order.end(), [&](int64_t i, int64_t j) {
          return frame_topk_before(s[i], i, s[j], j);
        });
        int64_t* out = p.out + b * p.out_stride[0] + h * p.out_stride[1];
        for (int64_t r = 0; r < p.k; ++r)
          out[r * p.out_stride[2]] =
              r < kept ? p.candidates[b * p.cand_stride[0] + order[r] * p.cand_stride[1]] : int64_t{-1};
      }
    }
  });
}

void frame_topk_cpu(const at::Tensor& q, const at::Tensor& k_mean, const at::Tensor& candidates, int64_t k,
                    bool per_head, at::Tensor out) {
  const FrameTopkParams p = frame_topk_params(q, k_mean, candidates, k, per_head, out);
  TORCH_CHECK_VALUE(q.is_cpu(), "frame_topk_: the cpu kernel needs CPU tensors, got ", q.device());
  switch (q.scalar_type()) {
    case at::kFloat: frame_topk_kernel<float>(p); break;
    case at::kHalf: frame_topk_kernel<at::Half>(p); break;
    default: frame_topk_kernel<at::BFloat16>(p); break;
  }
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) { m.def(streamkern::kFrameTopkSchema); }

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("frame_topk_", &streamkern::frame_topk_cpu); }
