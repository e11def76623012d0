// frame_attention on the CPU (streamkern.frame_attention, backend "cpu"; docs/contract.md §4.5).
//
// For every (b, h) the keys are the listed pages of k_pages[b] (table order, ids outside [0, P) skipped) followed by
// new_k[b]; each page is attended where it lies, as a strided [F, D] block of the pool: no gather, no cat.
// at::parallel_for runs over tasks (b, h, group of kGroup query tiles of kTileQ rows). A task walks the key
// segments in kv tiles of at most kTileKV tokens (a segment is split into equal tiles) and, per kv tile:
//   Kᵀ tile -> a thread-local float32 pack [D, kv] (reused by the kGroup query tiles of the task; the query tiles
//   and, for fp16/bf16, the V tile are converted to float32 too),
//   S = Q·Kᵀ            (cpublas::brgemm, float32: oneDNN's f32 ukernel, faster on CPUs without AMX than the
//                        bf16 GEMM and keeping P in float32),
//   online softmax of the rows of S in float32 (online_softmax_row of streamkern/online_softmax.h: running max m
//   and sum l in units of sm_scale·q·k, exp vectorised by the compiler's AVX-512/AVX2 clones), the accumulator
//   rows rescaled,
//   acc += P·V          (cpublas::brgemm, float32; an fp32 V is read in place).
// out = acc / l and lse = m + log l; a row with no key gets out 0 and lse -inf. A False gate writes exactly that
// before any page or new_k is read. All offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "streamkern/online_softmax.h"
#include "streamkern/ops/frame_attention.h"

#if defined(CPUBLAS_BRGEMM_F32F32F32)
#define STREAMKERN_HAVE_BRGEMM 1
#endif

namespace streamkern {
namespace {

constexpr int64_t kTileQ = 256;   // query rows per tile
constexpr int64_t kGroup = 4;     // query tiles per task (they share each packed Kᵀ tile)
constexpr int64_t kTileKV = 512;  // most keys per kv tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A run of tokens of one (b, h): a page of the pool or the new keys; element (t, d) of k at k[t * k_t + d * k_d].
template <typename T>
struct Segment {
  const T* k;
  const T* v;
  int64_t n, k_t, k_d, v_t, v_d;
};

#ifdef STREAMKERN_HAVE_BRGEMM
inline void brgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* a,
                   const float* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, false);
}

template <typename T>
struct Problem {
  const T* q;
  const T* kp;
  const T* vp;
  const T* nk;
  const T* nv;
  const int64_t* table;
  const bool* gate;
  T* out;
  float* lse;
  int64_t B, Lq, H, D, P, F, K, Ln;
  int64_t qs[4], ks[5], vs[5], ts[3], nks[4], nvs[4], os[4], ls[3], gs;
  float scale;
};

// The key segments of (b, h) in attention order.
template <typename T>
void segments_of(const Problem<T>& p, int64_t b, int64_t h, std::vector<Segment<T>>& segs) {
  segs.clear();
  const int64_t* row = p.table + b * p.ts[0] + h * p.ts[1];
  for (int64_t e = 0; e < p.K; ++e) {
    const int64_t id = row[e * p.ts[2]];
    if (id < 0 || id >= p.P || p.F == 0) continue;
    segs.push_back({p.kp + b * p.ks[0] + id * p.ks[1] + h * p.ks[3], p.vp + b * p.vs[0] + id * p.vs[1] + h * p.vs[3],
                    p.F, p.ks[2], p.ks[4], p.vs[2], p.vs[4]});
  }
  if (p.nk != nullptr && p.Ln > 0)
    segs.push_back({p.nk + b * p.nks[0] + h * p.nks[2], p.nv + b * p.nvs[0] + h * p.nvs[2], p.Ln, p.nks[1],
                    p.nks[3], p.nvs[1], p.nvs[3]});
}

// Per-thread buffers of one task.
template <typename T>
struct Scratch {
  std::vector<float> q, kt, v, s, acc, m, l;
  std::vector<Segment<T>> segs;
  explicit Scratch(int64_t D)
      : q(kGroup * kTileQ * D), kt(D * kTileKV), v(kTileKV * D), s(kTileQ * kTileKV), acc(kGroup * kTileQ * D),
        m(kGroup * kTileQ), l(kGroup * kTileQ) {}
};

// Rows [q0, q0 + rows) of (b, h): out = acc / l, lse = m + log l (a row with l = 0: out 0, lse -inf).
template <typename T>
void write_rows(const Problem<T>& p, int64_t b, int64_t h, int64_t q0, int64_t rows, const float* acc,
                const float* m, const float* l) {
  T* o = p.out + b * p.os[0] + h * p.os[2];
  float* lse = p.lse + b * p.ls[0] + h * p.ls[1];
  for (int64_t r = 0; r < rows; ++r) {
    const bool any = l != nullptr && l[r] > 0.f;
    const float inv = any ? 1.f / l[r] : 0.f;
    T* orow = o + (q0 + r) * p.os[1];
    for (int64_t d = 0; d < p.D; ++d) orow[d * p.os[3]] = static_cast<T>(any ? acc[r * p.D + d] * inv : 0.f);
    lse[(q0 + r) * p.ls[2]] = any ? m[r] + std::log(l[r]) : kNegInf;
  }
}

template <typename T>
void run_task(const Problem<T>& p, int64_t b, int64_t h, int64_t g, Scratch<T>& w) {
  const int64_t D = p.D;
  const int64_t q_begin = g * kGroup * kTileQ, q_rows = std::min(kGroup * kTileQ, p.Lq - q_begin);
  const int64_t n_tiles = (q_rows + kTileQ - 1) / kTileQ;
  if (p.gate != nullptr && !p.gate[b * p.gs]) {  // before any page or new key is read
    write_rows<T>(p, b, h, q_begin, q_rows, nullptr, nullptr, nullptr);
    return;
  }
  const T* qbh = p.q + b * p.qs[0] + h * p.qs[2];
  for (int64_t r = 0; r < q_rows; ++r)
    for (int64_t d = 0; d < D; ++d) w.q[r * D + d] = static_cast<float>(qbh[(q_begin + r) * p.qs[1] + d * p.qs[3]]);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  segments_of(p, b, h, w.segs);
  for (const Segment<T>& seg : w.segs) {
    const int64_t n_kv = (seg.n + kTileKV - 1) / kTileKV, tile = (seg.n + n_kv - 1) / n_kv;
    for (int64_t k0 = 0; k0 < seg.n; k0 += tile) {
      const int64_t kv = std::min(tile, seg.n - k0);
      const T* kb = seg.k + k0 * seg.k_t;
      for (int64_t t = 0; t < kv; ++t)
        for (int64_t d = 0; d < D; ++d) w.kt[d * kv + t] = static_cast<float>(kb[t * seg.k_t + d * seg.k_d]);
      const T* vt = seg.v + k0 * seg.v_t;
      const float* vb = w.v.data();
      int64_t ldv = D;
      if constexpr (std::is_same_v<T, float>) {
        if (seg.v_d == 1 && (kv == 1 || seg.v_t >= D)) {  // read in place (a pool view always is)
          vb = vt;
          ldv = kv == 1 ? D : seg.v_t;
        }
      }
      if (vb == w.v.data())
        for (int64_t t = 0; t < kv; ++t)
          for (int64_t d = 0; d < D; ++d) w.v[t * D + d] = static_cast<float>(vt[t * seg.v_t + d * seg.v_d]);
      for (int64_t i = 0; i < n_tiles; ++i) {
        const int64_t rows = std::min(kTileQ, q_rows - i * kTileQ);
        float* acc = w.acc.data() + i * kTileQ * D;
        float* m = w.m.data() + i * kTileQ;
        float* l = w.l.data() + i * kTileQ;
        brgemm(rows, kv, D, D, kv, kv, false, w.q.data() + i * kTileQ * D, w.kt.data(), w.s.data());
        for (int64_t r = 0; r < rows; ++r)
          online_softmax_row(w.s.data() + r * kv, kv, p.scale, m[r], l[r], acc + r * D, D);
        brgemm(rows, D, kv, kv, ldv, D, true, w.s.data(), vb, acc);
      }
    }
  }
  for (int64_t i = 0; i < n_tiles; ++i) {
    const int64_t rows = std::min(kTileQ, q_rows - i * kTileQ);
    write_rows<T>(p, b, h, q_begin + i * kTileQ, rows, w.acc.data() + i * kTileQ * D, w.m.data() + i * kTileQ,
                  w.l.data() + i * kTileQ);
  }
}

template <typename T>
void attention(const Problem<T>& p) {
  const int64_t groups = (p.Lq + kGroup * kTileQ - 1) / (kGroup * kTileQ);
  at::parallel_for(0, p.B * p.H * groups, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w(p.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % groups, bh = task / groups;
      run_task<T>(p, bh / p.H, bh % p.H, g, w);
    }
    at::native::cpublas::brgemm_release(false);
  });
}
#endif  // STREAMKERN_HAVE_BRGEMM

void frame_attention_cpu(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                         const at::Tensor& page_table, const std::optional<at::Tensor>& new_k,
                         const std::optional<at::Tensor>& new_v, const std::optional<at::Tensor>& gate,
                         double sm_scale, at::Tensor out, at::Tensor lse) {
  check_frame_attention_args(q, k_pages, v_pages, page_table, new_k, new_v, gate, out, lse);
  TORCH_CHECK_VALUE(q.is_cpu(), "frame_attention_: the cpu kernel needs CPU tensors, got ", q.device());
#ifndef STREAMKERN_HAVE_BRGEMM
  TORCH_CHECK(false, "frame_attention_: the cpu kernel needs at::native::cpublas::brgemm (torch >= 2.7)");
#else
  if (q.numel() == 0) return;
  const auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    Problem<scalar_t> p{};
    p.q = q.const_data_ptr<scalar_t>();
    p.kp = k_pages.const_data_ptr<scalar_t>();
    p.vp = v_pages.const_data_ptr<scalar_t>();
    p.nk = new_k.has_value() ? new_k->const_data_ptr<scalar_t>() : nullptr;
    p.nv = new_v.has_value() ? new_v->const_data_ptr<scalar_t>() : nullptr;
    p.table = page_table.const_data_ptr<int64_t>();
    p.gate = gate.has_value() ? gate->const_data_ptr<bool>() : nullptr;
    p.gs = gate.has_value() ? gate->stride(0) : 0;
    p.out = out.mutable_data_ptr<scalar_t>();
    p.lse = lse.mutable_data_ptr<float>();
    p.B = q.size(0), p.Lq = q.size(1), p.H = q.size(2), p.D = q.size(3);
    p.P = k_pages.size(1), p.F = k_pages.size(2), p.K = page_table.size(2);
    p.Ln = new_k.has_value() ? new_k->size(1) : 0;
    for (int d = 0; d < 4; ++d) {
      p.qs[d] = q.stride(d);
      p.os[d] = out.stride(d);
      p.nks[d] = new_k.has_value() ? new_k->stride(d) : 0;
      p.nvs[d] = new_v.has_value() ? new_v->stride(d) : 0;
    }
    for (int d = 0; d < 5; ++d) p.ks[d] = k_pages.stride(d), p.vs[d] = v_pages.stride(d);
    for (int d = 0; d < 3; ++d) p.ts[d] = page_table.stride(d), p.ls[d] = lse.stride(d);
    p.scale = static_cast<float>(sm_scale);
    attention<scalar_t>(p);
  };
  if (q.scalar_type() == at::kFloat) run(float{});
  else if (q.scalar_type() == at::kHalf) run(at::Half{});
  else run(at::BFloat16{});
#endif
}

}  // namespace
}  // namespace streamkern

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) { m.def(streamkern::kFrameAttentionSchema); }

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("frame_attention_", &streamkern::frame_attention_cpu); }
