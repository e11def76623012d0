// Scale-block-masked attention on the CPU (streamkern.block_masked_attention, backend "cpu"; docs/contract.md §4.4).
//
// Query i attends key j when allow[q_scale[i], k_scale[j]] (or i == j with self_attend). The (Lq, Lk) plane is cut
// into kBlockQ x kBlockK blocks; each block pair is classified once from the scale ids present in its two token
// ranges: skip (no pair allowed: K/V never touched), full (every pair allowed: no element mask) or partial.
// at::parallel_for runs over (batch, head, q block). Per visited block pair: S = Q·Kᵀ and acc += P·V are float
// GEMMs (ATen mm on float copies of the blocks), the mask (partial blocks only: -inf scores) and the per-row online
// softmax between them (online_softmax_row of streamkern/online_softmax.h: running max m and sum l in units of
// sm_scale·q·k, rescaled accumulator, all float, exp vectorised by the compiler's AVX-512/AVX2 clones).
// Rows with no allowed key end with l = 0 and output 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "streamkern/online_softmax.h"
#include "streamkern/ops/block_masked_attention.h"

namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;
enum BlockClass : int8_t { kSkip = 0, kPartial = 1, kFull = 2 };

// Rows of `ids` per block -> flags [n_blocks, ns]: 1 where the block holds a token of that scale.
std::vector<uint8_t> presence(const int64_t* ids, int64_t n, int64_t block, int64_t ns) {
  const int64_t n_blocks = (n + block - 1) / block;
  std::vector<uint8_t> flags(n_blocks * ns, 0);
  for (int64_t i = 0; i < n; ++i) flags[(i / block) * ns + ids[i]] = 1;
  return flags;
}

// Class of every (q block, k block) pair, row-major [nq, nk].
std::vector<int8_t> classify(const int64_t* qs, int64_t Lq, const int64_t* ks, int64_t Lk, const bool* allow,
                             int64_t ns, bool self_attend) {
  const int64_t nq = (Lq + kBlockQ - 1) / kBlockQ, nk = (Lk + kBlockK - 1) / kBlockK;
  const auto pq = presence(qs, Lq, kBlockQ, ns), pk = presence(ks, Lk, kBlockK, ns);
  std::vector<int8_t> cls(nq * nk);
  for (int64_t tq = 0; tq < nq; ++tq) {
    for (int64_t tk = 0; tk < nk; ++tk) {
      bool any = false, all = true;
      for (int64_t a = 0; a < ns; ++a) {
        if (!pq[tq * ns + a]) continue;
        for (int64_t b = 0; b < ns; ++b) {
          if (!pk[tk * ns + b]) continue;
          if (allow[a * ns + b]) any = true; else all = false;
        }
      }
      const bool overlap = tq * kBlockQ < (tk + 1) * kBlockK && tk * kBlockK < (tq + 1) * kBlockQ;
      any = any || (self_attend && overlap);
      cls[tq * nk + tk] = any ? (all ? kFull : kPartial) : kSkip;
    }
  }
  return cls;
}

// dst[r, d] = float(src[r * s_row + d * s_d]) for r < rows, d < D (a block of rows, packed).
template <typename scalar_t>
void load_rows(const scalar_t* src, int64_t rows, int64_t s_row, int64_t s_d, int64_t D, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<float>(src[r * s_row + d * s_d]);
}

// One visited block pair: masks the scores S [rows, cols] (partial blocks only), folds them into the running max m
// and sum l of each row, rescales the accumulator rows and leaves P = exp(sm_scale·S − m') in S.
void online_softmax_block(float* S, int64_t rows, int64_t cols, int64_t q0, int64_t k0, bool partial,
                          const int64_t* qs, const int64_t* ks, const bool* allow, int64_t ns, bool self_attend,
                          float sm_scale, float* m, float* l, float* acc, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = S + r * cols;
    if (partial) {
      const bool* arow = allow + qs[q0 + r] * ns;
      for (int64_t j = 0; j < cols; ++j)
        if (!(arow[ks[k0 + j]] || (self_attend && q0 + r == k0 + j))) sr[j] = -std::numeric_limits<float>::infinity();
    }
    streamkern::online_softmax_row(sr, cols, sm_scale, m[r], l[r], acc + r * D, D);
  }
}

template <typename scalar_t>
void attention_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const int64_t* qs, const int64_t* ks, const bool* allow, int64_t ns, bool self_attend,
                      float sm_scale) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t nq = (Lq + kBlockQ - 1) / kBlockQ, nk = (Lk + kBlockK - 1) / kBlockK;
  const auto cls = classify(qs, Lq, ks, Lk, allow, ns, self_attend);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  // Tasks are (b, h, q block) with the q block fastest: a thread converts the K/V of a head to float once for
  // the run of q blocks it gets from that head, then each block pair is two small float GEMMs (ATen mm).
  at::parallel_for(0, B * H * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(std::max<int64_t>(Lk, 1) * D), vf(std::max<int64_t>(Lk, 1) * D);
    std::vector<float> qf(kBlockQ * D), acc(kBlockQ * D), s(kBlockQ * kBlockK), m(kBlockQ), l(kBlockQ);
    const at::Tensor K = at::from_blob(kf.data(), {Lk, D}, f32), V = at::from_blob(vf.data(), {Lk, D}, f32);
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tq = task % nq, bh = task / nq, h = bh % H, b = bh / H;
      if (bh != loaded) {
        load_rows(kp + b * k.stride(0) + h * k.stride(1), Lk, k.stride(2), k.stride(3), D, kf.data());
        load_rows(vp + b * v.stride(0) + h * v.stride(1), Lk, v.stride(2), v.stride(3), D, vf.data());
        loaded = bh;
      }
      const int64_t q0 = tq * kBlockQ, rows = std::min(kBlockQ, Lq - q0);
      load_rows(qp + b * q.stride(0) + h * q.stride(1) + q0 * q.stride(2), rows, q.stride(2), q.stride(3), D,
                qf.data());
      const at::Tensor Q = at::from_blob(qf.data(), {rows, D}, f32);
      at::Tensor Acc = at::from_blob(acc.data(), {rows, D}, f32);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t tk = 0; tk < nk; ++tk) {
        const int8_t c = cls[tq * nk + tk];
        if (c == kSkip) continue;
        const int64_t k0 = tk * kBlockK, cols = std::min(kBlockK, Lk - k0);
        at::Tensor S = at::from_blob(s.data(), {rows, cols}, f32);
        at::mm_out(S, Q, K.narrow(0, k0, cols).t());
        online_softmax_block(s.data(), rows, cols, q0, k0, c == kPartial, qs, ks, allow, ns, self_attend, sm_scale,
                             m.data(), l.data(), acc.data(), D);
        Acc.addmm_(S, V.narrow(0, k0, cols));
      }
      scalar_t* o = op + b * out.stride(0) + h * out.stride(1) + q0 * out.stride(2);
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t d = 0; d < D; ++d)
          o[r * out.stride(2) + d * out.stride(3)] = static_cast<scalar_t>(acc[r * D + d] * inv);
      }
    }
  });
}

void block_masked_attention_cpu(at::Tensor out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& q_scale, const at::Tensor& k_scale, const at::Tensor& allow,
                                bool self_attend, double sm_scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "block_masked_attention_: q, k, v must be 4-d");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "block_masked_attention_: q [B, H, Lq, D] and k, v [B, H, Lk, D] do not match");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "block_masked_attention_: out must match q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "block_masked_attention_: q, k, v must share one dtype");
  TORCH_CHECK(allow.dim() == 2 && allow.size(0) == allow.size(1) && allow.scalar_type() == at::kBool,
              "block_masked_attention_: allow must be a square bool matrix");
  TORCH_CHECK(q_scale.numel() == q.size(2) && k_scale.numel() == k.size(2),
              "block_masked_attention_: q_scale/k_scale must hold one id per query/key");
  TORCH_CHECK(!self_attend || q.size(2) == k.size(2), "block_masked_attention_: self_attend needs Lq == Lk");
  const int64_t ns = allow.size(0);
  const auto qs = q_scale.to(at::kLong).contiguous(), ks = k_scale.to(at::kLong).contiguous();
  const auto allow_c = allow.contiguous();
  for (const auto* ids : {&qs, &ks})
    TORCH_CHECK(ids->numel() == 0 || (ids->min().item<int64_t>() >= 0 && ids->max().item<int64_t>() < ns),
                "block_masked_attention_: scale ids must lie in [0, ", ns, ")");
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "block_masked_attention_cpu", [&] {
    attention_kernel<scalar_t>(out, q, k, v, qs.const_data_ptr<int64_t>(), ks.const_data_ptr<int64_t>(),
                               allow_c.const_data_ptr<bool>(), ns, self_attend, static_cast<float>(sm_scale));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(streamkern_C, m) {
  m.def(streamkern::kBlockMaskedAttentionSchema);
}

TORCH_LIBRARY_IMPL(streamkern_C, CPU, m) { m.impl("block_masked_attention_", &block_masked_attention_cpu); }
