// Per-cell math of the drift gate shared by the CPU and CUDA kernels (host and device): bilinear up-sampling
// with PyTorch's align_corners=False sampling, and the max-pool dilation of the up-sampled map with -inf padding.
#pragma once
#include <cstdint>
#include <limits>

#include "streamkern/common.h"

namespace streamkern {

// Importance map of one batch row: gh x gw float32 with strides (elements).
struct ImportanceMap {
  const float* p;
  int64_t s_h, s_w;
  int gh, gw;
};

// Source taps of output index `dst` along one axis: in[i0]·l0 + in[i1]·l1 (upsample_bilinear2d, align_corners=False:
// src = (in/out)·(dst + 0.5) − 0.5 clamped at 0, i1 = i0 + 1 unless i0 is the last input index).
struct Taps {
  int i0, i1;
  float l0, l1;
};

STREAMKERN_HD Taps bilinear_taps(int dst, int in_size, int out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  Taps t;
  t.i0 = static_cast<int>(src);
  t.i1 = t.i0 + (t.i0 < in_size - 1 ? 1 : 0);
  t.l1 = src - static_cast<float>(t.i0);
  t.l0 = 1.f - t.l1;
  return t;
}

// interpolate(map, (h, w), bilinear, align_corners=False)[y, x].
STREAMKERN_HD float upsampled(const ImportanceMap& m, int h, int w, int y, int x) {
  const Taps ty = bilinear_taps(y, m.gh, h), tx = bilinear_taps(x, m.gw, w);
  const float* r0 = m.p + ty.i0 * m.s_h;
  const float* r1 = m.p + ty.i1 * m.s_h;
  return ty.l0 * (tx.l0 * r0[tx.i0 * m.s_w] + tx.l1 * r0[tx.i1 * m.s_w]) +
         ty.l1 * (tx.l0 * r1[tx.i0 * m.s_w] + tx.l1 * r1[tx.i1 * m.s_w]);
}

// max(a, b) that returns NaN when either is NaN (PyTorch's max pooling and amax keep a NaN once they have seen one).
template <typename F>
STREAMKERN_HD F nan_max(F a, F b) { return (b > a || b != b || a != a) ? (a != a ? a : b) : a; }

// max_pool2d(upsampled, dilation, stride=1, padding=dilation/2)[y, x]; out-of-range taps are skipped (-inf padding),
// NaN propagates as in PyTorch's max pooling.
STREAMKERN_HD float dilated_weight(const ImportanceMap& m, int h, int w, int y, int x, int dilation) {
  const int r = dilation / 2;
  const int y0 = y - r < 0 ? 0 : y - r, y1 = y + r >= h ? h - 1 : y + r;
  const int x0 = x - r < 0 ? 0 : x - r, x1 = x + r >= w ? w - 1 : x + r;
  float best = -std::numeric_limits<float>::infinity();
  for (int yy = y0; yy <= y1; ++yy)
    for (int xx = x0; xx <= x1; ++xx) {
      best = nan_max(best, upsampled(m, h, w, yy, xx));
    }
  return best;
}

// GateReason codes (streamkern.GateReason).
enum GateReasonCode : int64_t { kReasonReuse = 0, kReasonState = 1, kReasonVision = 2, kReasonFirst = 3 };

struct GateOutcome {
  bool recompute;
  int64_t reason;
  float drift;
};

// DriftGate.should_recompute's decision from the state guard's max |Δstate| and the batch-mean drift; thresholds
// compare in double as the seed's Python floats do, and a NaN exceeds any threshold.
STREAMKERN_HD GateOutcome gate_decision(bool has_prev_frame, float mean_drift, double drift_threshold,
                                        bool has_prev_state, double state_diff, double state_threshold) {
  if (has_prev_state && !(state_diff <= state_threshold))
    return {true, kReasonState, static_cast<float>(state_diff)};
  if (!has_prev_frame) return {true, kReasonFirst, 100.f};
  const bool run = !(static_cast<double>(mean_drift) <= drift_threshold);
  return {run, run ? kReasonVision : kReasonReuse, mean_drift};
}

}  // namespace streamkern
