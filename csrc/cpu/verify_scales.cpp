// Batched scale verification (docs/contract.md §4.4): the op schema and the CPU kernel.
// Pass 1, parallel over token rows (b, t): CFG combine, online max/sum/argmax over V in float, match bit,
// provisional token. Pass 2, parallel over b: per-scale ratios, leading accepted run, final tokens outside the
// first rejected scale. Pass 3 (sample mode), parallel over rows: the rejected rows of the first rejected scale
// only, residual redraw by inverse CDF (two more reads of those rows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "streamkern/ops/verify_scales.h"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Window {
  std::vector<int64_t> scale_of;  // [T] window-relative scale of each token
  std::vector<float> ratio;       // [T] CFG ratio of each token's scale (0 without CFG)
};

Window make_window(at::IntArrayRef offsets, const c10::optional<at::ArrayRef<double>>& cfg) {
  Window w;
  for (size_t s = 0; s + 1 < offsets.size(); ++s)
    for (int64_t t = offsets[s]; t < offsets[s + 1]; ++t) {
      w.scale_of.push_back(static_cast<int64_t>(s));
      w.ratio.push_back(cfg.has_value() ? static_cast<float>((*cfg)[s]) : 0.f);
    }
  return w;
}

// One token row: the conditional row, the unconditional row (or null) and the CFG ratio.
template <typename T> struct Row {
  const T* cond;
  const T* uncond;
  int64_t stride;
  float w;
  float at(int64_t v) const {
    const float c = static_cast<float>(cond[v * stride]);
    return uncond ? (1.f + w) * c - w * static_cast<float>(uncond[v * stride]) : c;
  }
};

struct RowStats {
  bool bad = false;   // NaN or +inf somewhere, or all -inf
  float max = -kInf;  // of the logits (greedy) or of logits / temperature (sample)
  float sum = 0.f;    // Σ exp(z - max) (sample)
  int64_t arg = -1;   // lowest index of the max (greedy)
};

constexpr int64_t kChunk = 256;
constexpr int kLanes = 8;

// buf[j] = l(v0 + j) · scale for j < n (the CFG combine, contiguous rows in a loop the compiler vectorises).
template <typename T> void load_chunk(const Row<T>& row, int64_t v0, int64_t n, float scale, float* buf) {
  if (row.stride != 1) {
    for (int64_t j = 0; j < n; ++j) buf[j] = row.at(v0 + j) * scale;
  } else if (row.uncond) {
    const T* c = row.cond + v0;
    const T* u = row.uncond + v0;
    for (int64_t j = 0; j < n; ++j)
      buf[j] = ((1.f + row.w) * static_cast<float>(c[j]) - row.w * static_cast<float>(u[j])) * scale;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(row.cond[v0 + j]) * scale;
  }
}

// Max of buf[0, n) in kLanes independent lanes, and whether any entry is NaN or +inf.
std::pair<float, bool> chunk_max(const float* buf, int64_t n) {
  float m[kLanes];
  int ok[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -kInf, ok[l] = 1;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      m[l] = buf[j + l] > m[l] ? buf[j + l] : m[l];
      ok[l] &= buf[j + l] < kInf;
    }
  for (; j < n; ++j) {
    m[0] = buf[j] > m[0] ? buf[j] : m[0];
    ok[0] &= buf[j] < kInf;
  }
  bool bad = false;
  for (int l = 0; l < kLanes; ++l) m[0] = std::max(m[0], m[l]), bad |= !ok[l];
  return {m[0], bad};
}

template <typename T> RowStats scan_row(const Row<T>& row, int64_t V, bool greedy, float inv_temp) {
  RowStats st;
  float buf[kChunk];
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t n = std::min(kChunk, V - v0);
    load_chunk(row, v0, n, greedy ? 1.f : inv_temp, buf);
    const auto [cm, bad] = chunk_max(buf, n);
    st.bad |= bad;
    if (!(cm > st.max)) {
      if (greedy || !(st.max > -kInf)) continue;
    } else if (greedy) {  // the first index of the new maximum (lowest index on ties)
      int64_t j = 0;
      while (buf[j] != cm) ++j;
      st.max = cm;
      st.arg = v0 + j;
      continue;
    }
    const float m = std::max(st.max, cm);
    float s = 0.f;
    for (int64_t j = 0; j < n; ++j) s += std::exp(buf[j] - m);
    st.sum = (st.max > -kInf ? st.sum * std::exp(st.max - m) : 0.f) + s;
    st.max = m;
  }
  st.bad |= st.max == -kInf;
  return st;
}

// max(0, d) with a NaN d giving 0 (the rule every backend follows for unchecked draft probabilities).
inline float positive_part(float d) { return d > 0.f ? d : 0.f; }

// Inverse CDF draw from r = max(0, p - q) (p when Σ r = 0); p(v) = exp(l(v)/temp - max) / sum.
template <typename T, typename Q>
int64_t redraw(const Row<T>& row, const Q* q, int64_t qs, int64_t V, float inv_temp, float max, float sum, float u) {
  auto p = [&](int64_t v) { return std::exp(row.at(v) * inv_temp - max) / sum; };
  float residual = 0.f;
  for (int64_t v = 0; v < V; ++v) residual += positive_part(p(v) - static_cast<float>(q[v * qs]));
  const bool use_p = !(residual > 0.f);
  float total = 0.f;
  if (use_p)
    for (int64_t v = 0; v < V; ++v) total += p(v);
  const float target = u * (use_p ? total : residual);
  float cum = 0.f;
  int64_t last = -1;
  for (int64_t v = 0; v < V; ++v) {
    const float w = use_p ? p(v) : positive_part(p(v) - static_cast<float>(q[v * qs]));
    cum += w;
    if (w > 0.f) last = v;
    if (cum > target && w > 0.f) return v;
  }
  return last;
}

template <typename T, typename Q>
void verify_cpu(at::Tensor& accepted, at::Tensor& match, at::Tensor& ratio, at::Tensor& tokens, at::Tensor& stats,
                const at::Tensor& logits, const at::Tensor& draft, const c10::optional<at::Tensor>& draft_probs,
                const c10::optional<at::Tensor>& uniforms, at::IntArrayRef offsets, const Window& win, bool cfg,
                bool greedy, double threshold, double temperature) {
  const int64_t B = draft.size(0), T_ = draft.size(1), V = logits.size(2), NS = offsets.size() - 1;
  const T* lg = logits.data_ptr<T>();
  const int64_t l0 = logits.stride(0), l1 = logits.stride(1), l2 = logits.stride(2);
  const int64_t* dr = draft.data_ptr<int64_t>();
  const int64_t d0 = draft.stride(0), d1 = draft.stride(1);
  const Q* qp = greedy ? nullptr : draft_probs->data_ptr<Q>();
  const int64_t q0 = greedy ? 0 : draft_probs->stride(0), q1 = greedy ? 0 : draft_probs->stride(1),
                q2 = greedy ? 0 : draft_probs->stride(2);
  const float* un = greedy ? nullptr : uniforms->data_ptr<float>();
  const int64_t u0 = greedy ? 0 : uniforms->stride(0), u1 = greedy ? 0 : uniforms->stride(1),
                u2 = greedy ? 0 : uniforms->stride(2);
  bool* mt = match.data_ptr<bool>();
  int64_t* tk = tokens.data_ptr<int64_t>();
  int64_t* acc = accepted.data_ptr<int64_t>();
  float* rt = ratio.data_ptr<float>();
  float* st = greedy ? nullptr : stats.data_ptr<float>();
  const float inv_temp = static_cast<float>(1.0 / temperature);
  auto row_of = [&](int64_t b, int64_t t) {
    return Row<T>{lg + b * l0 + t * l1, cfg ? lg + (B + b) * l0 + t * l1 : nullptr, l2, win.ratio[t]};
  };

  at::parallel_for(0, B * T_, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / T_, t = i % T_, x = dr[b * d0 + t * d1];
      const Row<T> row = row_of(b, t);
      const RowStats s = scan_row(row, V, greedy, inv_temp);
      if (greedy) {
        mt[i] = !s.bad && s.arg == x;
        tk[i] = s.bad ? -1 : s.arg;
      } else {
        const float px = std::exp(row.at(x) * inv_temp - s.max) / s.sum;
        const float qx = static_cast<float>(qp[b * q0 + t * q1 + x * q2]);
        mt[i] = !s.bad && qx > 0.f && un[b * u0 + t * u1] * qx < px;
        tk[i] = mt[i] ? x : -1;
        st[2 * i] = s.bad ? std::numeric_limits<float>::quiet_NaN() : s.max;
        st[2 * i + 1] = s.sum;
      }
    }
  });

  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int64_t run = 0;
      bool open = true;
      for (int64_t s = 0; s < NS; ++s) {
        int64_t hits = 0;
        for (int64_t t = offsets[s]; t < offsets[s + 1]; ++t) hits += mt[b * T_ + t];
        const float r = static_cast<float>(hits) / static_cast<float>(offsets[s + 1] - offsets[s]);
        rt[b * NS + s] = r;
        const bool ok = greedy ? r >= static_cast<float>(threshold) : hits == offsets[s + 1] - offsets[s];
        open = open && ok;
        run += open;
      }
      acc[b] = run;
      for (int64_t t = 0; t < T_; ++t) {
        const int64_t s = win.scale_of[t];
        if (s < run) tk[b * T_ + t] = dr[b * d0 + t * d1];
        else if (s > run) tk[b * T_ + t] = -1;
      }
    }
  });

  if (greedy) return;
  at::parallel_for(0, B * T_, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / T_, t = i % T_;
      if (win.scale_of[t] != acc[b] || mt[i]) continue;
      const float m = st[2 * i];
      tk[i] = std::isnan(m) ? -1
                            : redraw(row_of(b, t), qp + b * q0 + t * q1, q2, V, inv_temp, m, st[2 * i + 1],
                                     un[b * u0 + t * u1 + u2]);
    }
  });
}

void verify_scales_cpu(at::Tensor& accepted, at::Tensor& match, at::Tensor& ratio, at::Tensor& tokens,
                       at::Tensor& stats, const at::Tensor& logits, const at::Tensor& draft_tokens,
                       const c10::optional<at::Tensor>& draft_probs, const c10::optional<at::Tensor>& uniforms,
                       at::IntArrayRef offsets, c10::optional<at::ArrayRef<double>> cfg, bool greedy,
                       double threshold, double temperature) {
  streamkern::check_verify_scales_args(accepted, match, ratio, tokens, stats, logits, draft_tokens, draft_probs,
                                       uniforms, offsets, cfg, greedy);
  const Window win = make_window(offsets, cfg);
  const at::ScalarType qtype = greedy ? logits.scalar_type() : draft_probs->scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "verify_scales_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qtype, "verify_scales_cpu_q", [&] {
      verify_cpu<T, scalar_t>(accepted, match, ratio, tokens, stats, logits, draft_tokens, draft_probs, uniforms,
                              offsets, win, cfg.has_value(), greedy, threshold, temperature);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kVerifyScalesSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("verify_scales_", &verify_scales_cpu); }
