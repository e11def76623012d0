// Consensus frame scoring (docs/contract.md §4.1): the op schema and its CPU kernel.
//
//   score[b, f] = Σ_i λ_i / (H·√D·fsl) · Σ_{t ∈ f} k_{l_i}[b, t, :] · q_i[b, :]
//   q_i[b, :]   = Σ_s w[b, s] · text_k[l_i, b, s, :] / (Σ_s w[b, s] + 1e-8)        (flattened H·D vectors)
//
// Two at::parallel_for passes, float accumulation, fp16/bf16 converted in registers:
//   1. q for every (selected layer, batch row, head): one read of each selected layer's text keys;
//   2. per-token dots k·q for every (selected layer, batch row, frame, token block): one read of each selected
//      layer's chunk keys, a partial sum per task; the partials are summed in a fixed order (deterministic).
// No [S, L] intermediate. Rows whose H·D elements are contiguous take one long AVX2 dot; other layouts walk
// the head and dim strides (unit-stride dims still vectorised per head).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>
#include "streamkern/ops/consensus_frame_scores.h"

namespace streamkern {
namespace {

// ---- dot and axpy over a strided span of n elements of T, accumulated in float -----------------------------

template <typename T> struct SpanOps {
  float (*dot)(const float* q, const T* p, int64_t n);  // Σ q[i]·p[i], p contiguous
  void (*axpy)(float* q, float w, const T* p, int64_t n);  // q[i] += w·p[i], p contiguous
};

namespace scalar {
template <typename T> float dot(const float* q, const T* p, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += q[i] * static_cast<float>(p[i]);
  return s;
}
template <typename T> void axpy(float* q, float w, const T* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) q[i] += w * static_cast<float>(p[i]);
}
}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the high half of a float
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
template <typename T> float dot(const float* q, const T* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(load8(p + i), _mm256_loadu_ps(q + i), a0);
    a1 = _mm256_fmadd_ps(load8(p + i + 8), _mm256_loadu_ps(q + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(p + i + 16), _mm256_loadu_ps(q + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(p + i + 24), _mm256_loadu_ps(q + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(p + i), _mm256_loadu_ps(q + i), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += q[i] * static_cast<float>(p[i]);
  return s;
}
template <typename T> void axpy(float* q, float w, const T* p, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(q + i, _mm256_fmadd_ps(wv, load8(p + i), _mm256_loadu_ps(q + i)));
  for (; i < n; ++i) q[i] += w * static_cast<float>(p[i]);
}
}  // namespace avx2
#pragma GCC pop_options

template <typename T> SpanOps<T> span_ops() {
  static const bool has_avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (has_avx2) return {&avx2::dot<T>, &avx2::axpy<T>};
  return {&scalar::dot<T>, &scalar::axpy<T>};
}

// ---- one [H, D] row of keys with element strides (sh, sd) -------------------------------------------------

struct RowLayout {
  int64_t H, D, sh, sd;
  bool flat() const { return sd == 1 && (sh == D || H == 1); }  // the H·D elements are one contiguous span
};

template <typename T> float row_dot(const SpanOps<T>& ops, const float* q, const T* p, const RowLayout& r) {
  if (r.flat()) return ops.dot(q, p, r.H * r.D);
  float s = 0.f;
  for (int64_t h = 0; h < r.H; ++h) {
    const T* ph = p + h * r.sh;
    const float* qh = q + h * r.D;
    if (r.sd == 1) {
      s += ops.dot(qh, ph, r.D);
    } else {
      for (int64_t d = 0; d < r.D; ++d) s += qh[d] * static_cast<float>(ph[d * r.sd]);
    }
  }
  return s;
}

// Normalised entity weights, [B, S] float: w / (Σ_s w + 1e-8) per batch row ([S] weights are shared).
std::vector<float> normalized_weights(const at::Tensor& ew, int64_t B, int64_t S) {
  std::vector<float> w(static_cast<size_t>(B * S));
  const int64_t sb = ew.dim() == 2 ? ew.stride(0) : 0;
  const int64_t ss = ew.stride(ew.dim() - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ew.scalar_type(), "consensus_weights", [&] {
    const scalar_t* p = ew.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      float sum = 0.f;
      for (int64_t s = 0; s < S; ++s) sum += static_cast<float>(p[b * sb + s * ss]);
      const float inv = 1.f / (sum + 1e-8f);
      for (int64_t s = 0; s < S; ++s) w[b * S + s] = static_cast<float>(p[b * sb + s * ss]) * inv;
    }
  });
  return w;
}

// Tokens per phase-2 task: enough work per task to amortise the partial sum, small enough to balance.
constexpr int64_t kTokenBlock = 256;

template <typename T>
void consensus_cpu(at::Tensor& out, const at::Tensor& chunk_k, const at::Tensor& text_k, const at::Tensor& ew,
                   int64_t fsl, const std::vector<int64_t>& layers, const std::vector<double>& lw) {
  const int64_t NS = static_cast<int64_t>(layers.size());
  const int64_t B = chunk_k.size(1), L = chunk_k.size(2), H = chunk_k.size(3), D = chunk_k.size(4);
  const int64_t S = text_k.size(2), F = L / fsl, HD = H * D;
  const SpanOps<T> ops = span_ops<T>();
  const std::vector<float> w = normalized_weights(ew, B, S);
  const T* kp = chunk_k.const_data_ptr<T>();
  const T* tp = text_k.const_data_ptr<T>();
  const RowLayout krow{H, D, chunk_k.stride(3), chunk_k.stride(4)};

  // 1. q[i, b, h, :] = Σ_s w[b, s] · text_k[l_i, b, s, h, :]
  std::vector<float> q(static_cast<size_t>(NS * B * HD), 0.f);
  const int64_t q_tasks = NS * B * H;
  const int64_t q_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S * D));
  at::parallel_for(0, q_tasks, q_grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % H, b = (task / H) % B, i = task / (H * B);
      float* qh = q.data() + (i * B + b) * HD + h * D;
      const T* base = tp + layers[i] * text_k.stride(0) + b * text_k.stride(1) + h * text_k.stride(3);
      const float* wb = w.data() + b * S;
      for (int64_t s = 0; s < S; ++s) {
        const T* row = base + s * text_k.stride(2);
        if (text_k.stride(4) == 1) {
          ops.axpy(qh, wb[s], row, D);
        } else {
          for (int64_t d = 0; d < D; ++d) qh[d] += wb[s] * static_cast<float>(row[d * text_k.stride(4)]);
        }
      }
    }
  });

  // 2. part[i, b, f, j] = Σ over token block j of frame f of k_{l_i}[b, t, :] · q[i, b, :]
  const int64_t blocks = (fsl + kTokenBlock - 1) / kTokenBlock;
  const int64_t tb = (fsl + blocks - 1) / blocks;  // even blocks within a frame
  std::vector<float> part(static_cast<size_t>(NS * B * F * blocks));
  const int64_t k_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, tb * HD));
  at::parallel_for(0, NS * B * F * blocks, k_grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task % blocks, f = (task / blocks) % F, b = (task / (blocks * F)) % B;
      const int64_t i = task / (blocks * F * B);
      const float* qb = q.data() + (i * B + b) * HD;
      const T* base = kp + layers[i] * chunk_k.stride(0) + b * chunk_k.stride(1);
      const int64_t t0 = f * fsl + j * tb, t1 = std::min(f * fsl + fsl, t0 + tb);
      float acc = 0.f;
      for (int64_t t = t0; t < t1; ++t) acc += row_dot(ops, qb, base + t * chunk_k.stride(2), krow);
      part[task] = acc;
    }
  });

  // 3. out[b, f] = Σ_i λ_i / (H·√D·fsl) · Σ_j part[i, b, f, j], in a fixed order.
  float* o = out.data_ptr<float>();
  const double norm = 1.0 / (static_cast<double>(H) * std::sqrt(static_cast<double>(D)) * static_cast<double>(fsl));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      double s = 0.0;
      for (int64_t i = 0; i < NS; ++i) {
        const float* p = part.data() + ((i * B + b) * F + f) * blocks;
        float frame = 0.f;
        for (int64_t j = 0; j < blocks; ++j) frame += p[j];
        s += lw[i] * norm * frame;
      }
      o[b * F + f] = static_cast<float>(s);
    }
  }
}

void consensus_frame_scores_cpu(at::Tensor out, const at::Tensor& chunk_k, const at::Tensor& text_k,
                                const at::Tensor& entity_weights, int64_t frame_seq_len, at::IntArrayRef layers,
                                at::ArrayRef<double> layer_weights) {
  check_consensus_frame_scores_args(out, chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights);
  if (out.numel() == 0) return;
  const std::vector<int64_t> ls(layers.begin(), layers.end());
  const std::vector<double> lw(layer_weights.begin(), layer_weights.end());
  switch (chunk_k.scalar_type()) {
    case at::kFloat: return consensus_cpu<float>(out, chunk_k, text_k, entity_weights, frame_seq_len, ls, lw);
    case at::kHalf: return consensus_cpu<c10::Half>(out, chunk_k, text_k, entity_weights, frame_seq_len, ls, lw);
    case at::kBFloat16:
      return consensus_cpu<c10::BFloat16>(out, chunk_k, text_k, entity_weights, frame_seq_len, ls, lw);
    default: TORCH_CHECK(false, "consensus_frame_scores_: unsupported dtype ", chunk_k.scalar_type());
  }
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kConsensusFrameScoresSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) {
  m.impl("consensus_frame_scores_", &streamkern::consensus_frame_scores_cpu);
}
