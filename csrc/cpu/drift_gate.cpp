// Drift gate (docs/contract.md §4.3): the op schemas and the CPU kernels.
//
// attention_weighted_drift_: one parallel pass over the rows of the pooled grid. Task (b, y) pools the `pool` image
// rows of grid row y for every channel (column sums over the rows, then over `pool` columns), writes
// small[b, :, y, :], and accumulates
// Σ_x mean_c|small − prev_small| · dilated_weight(y, x) into partial[b, y]; drift[b] then sums the partials in row
// order (deterministic). drift_gate_step_: the same pass, then the whole decision of DriftGate.should_recompute
// (state guard, batch mean, thresholds) in one op call. patch_importance_: tasks (b, chunk of key columns) sum the A
// action rows of every selected layer and head for their columns, then each batch row is normalised by its sum + 1e-8.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "streamkern/drift_gate_math.h"
#include "streamkern/torch_utils.h"
#include "streamkern/ops/drift_gate.h"

namespace streamkern {
namespace {

// Pools `image` into `small` and, when `prev_small` is given, writes drift[b] for every batch row.
template <typename T, typename S>
void pool_and_drift(float* drift, at::Tensor& small, const at::Tensor& image, const at::Tensor* prev_small,
                    const at::Tensor* importance, int64_t pool, int64_t dilation, float scale) {
  const int64_t B = image.size(0), C = image.size(1), h = small.size(2), w = small.size(3);
  const T* img = image.data_ptr<T>();
  S* out = small.data_ptr<S>();
  const int64_t si0 = image.stride(0), si1 = image.stride(1), si2 = image.stride(2), si3 = image.stride(3);
  const float inv = scale / static_cast<float>(pool * pool);
  const S* prev = prev_small == nullptr ? nullptr : prev_small->data_ptr<S>();
  const int64_t sp0 = prev ? prev_small->stride(0) : 0, sp1 = prev ? prev_small->stride(1) : 0,
                sp2 = prev ? prev_small->stride(2) : 0, sp3 = prev ? prev_small->stride(3) : 0;
  std::vector<float> partial(B * h);
  at::parallel_for(0, B * h, 1, [&](int64_t begin, int64_t end) {
    // Column sums of the `pool` image rows first (contiguous, vectorisable), then sums of `pool` columns.
    std::vector<float> row(w), colmax(w), colsum(w * pool);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / h, y = task % h;
      std::fill(row.begin(), row.end(), 0.f);
      for (int64_t c = 0; c < C; ++c) {
        std::fill(colsum.begin(), colsum.end(), 0.f);
        for (int64_t r = 0; r < pool; ++r) {
          const T* line = img + b * si0 + c * si1 + (y * pool + r) * si2;
          if (si3 == 1) {
            for (int64_t X = 0; X < w * pool; ++X) colsum[X] += static_cast<float>(line[X]);
          } else {
            for (int64_t X = 0; X < w * pool; ++X) colsum[X] += static_cast<float>(line[X * si3]);
          }
        }
        for (int64_t x = 0; x < w; ++x) {
          float acc = 0.f;
          for (int64_t s = 0; s < pool; ++s) acc += colsum[x * pool + s];
          const float v = acc * inv;
          out[((b * C + c) * h + y) * w + x] = static_cast<S>(v);
          if (prev != nullptr)
            row[x] += std::abs(v - static_cast<float>(prev[b * sp0 + c * sp1 + y * sp2 + x * sp3]));
        }
      }
      if (prev == nullptr) continue;
      const ImportanceMap map{importance->data_ptr<float>() + b * importance->stride(0), importance->stride(1),
                              importance->stride(2), static_cast<int>(importance->size(1)),
                              static_cast<int>(importance->size(2))};
      // The max-pool window is separable: the max over the window's rows of the up-sampled map, per column, then
      // the max of that over the window's columns (NaN propagates through both maxima as in PyTorch).
      const int64_t r = dilation / 2, y0 = std::max<int64_t>(0, y - r), y1 = std::min<int64_t>(h - 1, y + r);
      for (int64_t x = 0; x < w; ++x) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t yy = y0; yy <= y1; ++yy) m = nan_max(m, upsampled(map, int(h), int(w), int(yy), int(x)));
        colmax[x] = m;
      }
      float sum = 0.f;
      for (int64_t x = 0; x < w; ++x) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t xx = std::max<int64_t>(0, x - r); xx <= std::min<int64_t>(w - 1, x + r); ++xx)
          m = nan_max(m, colmax[xx]);
        sum += row[x] / static_cast<float>(C) * m;
      }
      partial[task] = sum;
    }
  });
  if (prev == nullptr) return;
  for (int64_t b = 0; b < B; ++b) {
    float sum = 0.f;
    for (int64_t y = 0; y < h; ++y) sum += partial[b * h + y];
    drift[b] = sum;
  }
}

// pool_and_drift on the image dtype: float32/float16/bfloat16 (small in the same dtype) or uint8 (small float32).
void pool_and_drift_dispatch(const char* op, float* drift, at::Tensor& small, const at::Tensor& image,
                             const at::Tensor* prev_small, const at::Tensor* importance, int64_t pool,
                             int64_t dilation) {
  switch (image.scalar_type()) {
    case at::kFloat:
      return pool_and_drift<float, float>(drift, small, image, prev_small, importance, pool, dilation, 1.f);
    case at::kHalf:
      return pool_and_drift<at::Half, at::Half>(drift, small, image, prev_small, importance, pool, dilation, 1.f);
    case at::kBFloat16:
      return pool_and_drift<at::BFloat16, at::BFloat16>(drift, small, image, prev_small, importance, pool, dilation,
                                                         1.f);
    case at::kByte:
      return pool_and_drift<uint8_t, float>(drift, small, image, prev_small, importance, pool, dilation,
                                            1.f / 255.f);
    default: TORCH_CHECK(false, op, ": unsupported image dtype ", image.scalar_type());
  }
}

void attention_weighted_drift_cpu(at::Tensor drift, at::Tensor small, const at::Tensor& image,
                                  const at::Tensor& prev_small, const at::Tensor& importance, int64_t pool,
                                  int64_t dilation) {
  check_weighted_drift_args(drift, small, image, prev_small, importance, pool, dilation);
  if (image.size(0) == 0) return;
  pool_and_drift_dispatch("attention_weighted_drift_", drift.data_ptr<float>(), small, image, &prev_small, &importance,
                          pool, dilation);
}

// max over the elements of |state − prev_state|, each difference rounded to T as PyTorch rounds it (the double
// difference of two T values rounds to T exactly like T's own subtraction), NaN if any is NaN.
template <typename T>
double state_max_diff(const at::Tensor& state, const at::Tensor& prev_state) {
  const int64_t R = state.size(0), K = state.size(1), s0 = state.stride(0), s1 = state.stride(1);
  const T* cur = state.data_ptr<T>();
  const T* prev = prev_state.data_ptr<T>();
  double best = -std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const double d = static_cast<double>(static_cast<T>(static_cast<double>(cur[r * s0 + k * s1]) -
                                                          static_cast<double>(prev[r * K + k])));
      best = nan_max(best, std::abs(d));
    }
  return best;
}

void drift_gate_step_cpu(at::Tensor recompute, at::Tensor reason, at::Tensor drift, at::Tensor small,
                         at::Tensor counter, const at::Tensor& image, const std::optional<at::Tensor>& prev_small,
                         const std::optional<at::Tensor>& importance, const at::Tensor& state,
                         const std::optional<at::Tensor>& prev_state, int64_t pool, int64_t dilation,
                         double drift_threshold, double state_threshold) {
  check_gate_step_args(recompute, reason, drift, small, counter, image, prev_small, importance, state, prev_state,
                       pool, dilation);
  const int64_t B = image.size(0);
  std::vector<float> drifts(B);
  pool_and_drift_dispatch("drift_gate_step_", drifts.data(), small, image, prev_small ? &*prev_small : nullptr,
                          importance ? &*importance : nullptr, pool, dilation);
  float sum = 0.f;
  for (const float d : drifts) sum += d;
  double state_diff = 0.0;
  if (prev_state.has_value()) {
    state_diff = AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, state.scalar_type(), "drift_gate_step_",
                                                 [&] { return state_max_diff<scalar_t>(state, *prev_state); });
  }
  const GateOutcome g = gate_decision(prev_small.has_value(), sum / static_cast<float>(B), drift_threshold,
                                      prev_state.has_value(), state_diff, state_threshold);
  *recompute.data_ptr<bool>() = g.recompute;
  *reason.data_ptr<int64_t>() = g.reason;
  *drift.data_ptr<float>() = g.drift;
}

constexpr int64_t kColumnChunk = 64;

template <typename T>
void patch_importance_kernel(at::Tensor& out, const at::Tensor& attn, int64_t start, int64_t end, int64_t V,
                             int64_t A) {
  const int64_t B = attn.size(1), H = attn.size(2), S = attn.size(3);
  const int64_t s0 = attn.stride(0), s1 = attn.stride(1), s2 = attn.stride(2), s3 = attn.stride(3),
                s4 = attn.stride(4);
  const T* a = attn.data_ptr<T>();
  float* o = out.data_ptr<float>();
  const int64_t chunks = (V + kColumnChunk - 1) / kColumnChunk;
  const float inv = 1.f / static_cast<float>((end - start) * H * A);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t stop) {
    float acc[kColumnChunk];
    for (int64_t task = begin; task < stop; ++task) {
      const int64_t b = task / chunks, v0 = (task % chunks) * kColumnChunk;
      const int64_t n = std::min(kColumnChunk, V - v0);
      std::fill(acc, acc + n, 0.f);
      for (int64_t l = start; l < end; ++l)
        for (int64_t hd = 0; hd < H; ++hd)
          for (int64_t q = S - A; q < S; ++q) {
            const T* row = a + l * s0 + b * s1 + hd * s2 + q * s3 + v0 * s4;
            for (int64_t v = 0; v < n; ++v) acc[v] += static_cast<float>(row[v * s4]);
          }
      for (int64_t v = 0; v < n; ++v) o[b * V + v0 + v] = acc[v] * inv;
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    float sum = 0.f;
    for (int64_t v = 0; v < V; ++v) sum += o[b * V + v];
    const float denom = sum + 1e-8f;
    for (int64_t v = 0; v < V; ++v) o[b * V + v] /= denom;
  }
}

void patch_importance_cpu(at::Tensor out, const at::Tensor& attn, int64_t start, int64_t end, int64_t V, int64_t A) {
  check_patch_importance_args(out, attn, start, end, V, A);
  switch (attn.scalar_type()) {
    case at::kFloat: return patch_importance_kernel<float>(out, attn, start, end, V, A);
    case at::kHalf: return patch_importance_kernel<at::Half>(out, attn, start, end, V, A);
    case at::kBFloat16: return patch_importance_kernel<at::BFloat16>(out, attn, start, end, V, A);
    default: TORCH_CHECK(false, "patch_importance_: unsupported attn dtype ", attn.scalar_type());
  }
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kAttentionWeightedDriftSchema);
  m.def(streamkern::kDriftGateStepSchema);
  m.def(streamkern::kPatchImportanceSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) {
  m.impl("attention_weighted_drift_", &streamkern::attention_weighted_drift_cpu);
  m.impl("drift_gate_step_", &streamkern::drift_gate_step_cpu);
  m.impl("patch_importance_", &streamkern::patch_importance_cpu);
}
