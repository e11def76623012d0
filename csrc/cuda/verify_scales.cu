// Batched scale verification (docs/contract.md §4.4), CUDA kernels.
// A "group" of G threads owns one token row: G = 32 (a warp, 8 rows per 256-thread block, shuffles only) when
// there are many rows of a small vocabulary, G = 256 or 1024 (the whole block) otherwise.
//  1. rows_kernel: CFG combine, one pass over V (16-byte vector loads when aligned) with a per-thread online
//     max/argmax (greedy) or max/Σexp (sample), one group reduction, then the draft token's match bit.
//  2. scales_kernel: one block per batch row, per-scale match counts (__syncthreads_count), accepted run, tokens.
//  3. redraw_kernel (sample mode): only rejected rows of the first rejected scale: Σ max(0, p − q), then an
//     inverse-CDF scan over G-element chunks (group prefix sums) that stops at the first chunk holding the draw.
#include <cfloat>
#include <climits>

#include "streamkern/cuda_utils.cuh"
#include "streamkern/ops/verify_scales.h"

namespace streamkern {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr float kInf = __builtin_huge_valf();

template <typename S> __device__ __forceinline__ S shfl_xor(S s, int o) {
  static_assert(sizeof(S) % 4 == 0, "shuffled structs are made of 32-bit words");
  int* w = reinterpret_cast<int*>(&s);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(S) / 4); ++i) w[i] = __shfl_xor_sync(kFull, w[i], o);
  return s;
}

// Reduction over the G threads of a group; every thread of the group gets the result.
template <int G, typename S, typename Op> __device__ S group_reduce(S v, Op op) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = op(v, shfl_xor(v, o));
  if constexpr (G == 32) {
    return v;
  } else {
    __shared__ S part[G / 32];
    __syncthreads();
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    v = part[0];
#pragma unroll
    for (int i = 1; i < G / 32; ++i) v = op(v, part[i]);
    return v;
  }
}

template <int G> __device__ __forceinline__ bool group_any(bool x) {
  if constexpr (G == 32) return __any_sync(kFull, x);
  else return __syncthreads_or(x);
}

// Inclusive prefix sum over the group (lane order).
template <int G> __device__ float group_scan(float x) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if constexpr (G == 32) {
    return x;
  } else {
    __shared__ float warp_total[G / 32];
    __syncthreads();
    if (lane == 31) warp_total[threadIdx.x / 32] = x;
    __syncthreads();
    for (int w = 0; w < static_cast<int>(threadIdx.x / 32); ++w) x += warp_total[w];
    return x;
  }
}

struct MaxArg {
  float m;
  int a;  // lowest index of the max; INT_MAX when none
};
struct MaxSum {
  float m, s;  // max of z and Σ exp(z − m)
};
struct Sums {
  float r, p;  // Σ max(0, p − q) and Σ p
};

__device__ __forceinline__ MaxArg combine(MaxArg x, MaxArg y) {
  return (y.m > x.m || (y.m == x.m && y.a < x.a)) ? y : x;
}
__device__ __forceinline__ MaxSum combine(MaxSum x, MaxSum y) {
  const float m = fmaxf(x.m, y.m);
  if (m == -kInf) return {m, 0.f};
  return {m, x.s * __expf(x.m - m) + y.s * __expf(y.m - m)};
}

__device__ __forceinline__ float load_float(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ int scale_of(const VerifyScalesParams& p, int64_t t) {
  int s = 0;
  while (s + 1 < p.NS && t >= p.offsets[s + 1]) ++s;
  return s;
}

// The token row (b, t): conditional and unconditional rows and the scale's CFG ratio.
template <typename T> struct Row {
  const T* cond;
  const T* uncond;
  float w;
  __device__ Row(const VerifyScalesParams& p, int64_t b, int64_t t, int s) {
    const T* base = static_cast<const T*>(p.logits);
    cond = base + b * p.sl0 + t * p.sl1;
    uncond = p.has_cfg ? base + (b + p.B) * p.sl0 + t * p.sl1 : nullptr;
    w = p.has_cfg ? p.cfg[s] : 0.f;
  }
  __device__ __forceinline__ float mix(float c, float u) const { return uncond ? (1.f + w) * c - w * u : c; }
  __device__ __forceinline__ float at(int64_t v, int64_t stride) const {
    return mix(to_float(cond[v * stride]), uncond ? to_float(uncond[v * stride]) : 0.f);
  }
};

// Visits every element v of the row owned by this lane, in increasing v, with its combined logit.
template <typename T, int G, typename F>
__device__ __forceinline__ void for_each_logit(const VerifyScalesParams& p, const Row<T>& row, int lane, F&& f) {
  if (p.logits_vec16) {
    constexpr int K = kVec<T>;
#pragma unroll 4
    for (int64_t i = lane; i < p.V / K; i += G) {
      const Vec16<T> c = Vec16<T>::load(row.cond + i * K);
      Vec16<T> u = c;
      if (row.uncond) u = Vec16<T>::load(row.uncond + i * K);
#pragma unroll
      for (int j = 0; j < K; ++j) f(i * K + j, row.mix(to_float(c.v[j]), to_float(u.v[j])));
    }
  } else {
    for (int64_t v = lane; v < p.V; v += G) f(v, row.at(v, p.sl2));
  }
}

template <typename T, int G> __global__ void __launch_bounds__(G == 32 ? 256 : G) rows_kernel(const VerifyScalesParams p) {
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (row_id >= p.B * p.T) return;  // whole groups only: G = 32 groups never synchronise the block
  const int64_t b = row_id / p.T, t = row_id % p.T;
  const Row<T> row(p, b, t, scale_of(p, t));
  const int64_t x = p.draft[b * p.sd0 + t * p.sd1];
  const bool in_vocab = x >= 0 && x < p.V;  // out-of-vocabulary ids (unchecked on GPU) are never read
  bool bad = false;
  if (p.greedy) {
    MaxArg st{-kInf, INT_MAX};
    for_each_logit<T, G>(p, row, lane, [&](int64_t v, float l) {
      bad |= !(l < kInf);
      if (l > st.m) st = {l, static_cast<int>(v)};
    });
    st = group_reduce<G>(st, [](MaxArg a, MaxArg c) { return combine(a, c); });
    bad = group_any<G>(bad) || st.m == -kInf;
    if (lane == 0) {
      p.match[row_id] = !bad && st.a == x;
      p.tokens[row_id] = bad ? -1 : st.a;
    }
    return;
  }
  MaxSum st{-kInf, 0.f};
  const float it = p.inv_temp;
  for_each_logit<T, G>(p, row, lane, [&](int64_t, float l) {
    const float z = l * it;
    bad |= !(z < kInf);  // sample mode: validity of l / temperature
    if (z > st.m) {
      st.s = st.s * __expf(st.m - z) + 1.f;
      st.m = z;
    } else if (z > -kInf) {
      st.s += __expf(z - st.m);
    }
  });
  st = group_reduce<G>(st, [](MaxSum a, MaxSum c) { return combine(a, c); });
  bad = group_any<G>(bad) || st.m == -kInf;
  if (lane == 0) {
    const float px = in_vocab ? __expf(row.at(x, p.sl2) * it - st.m) / st.s : 0.f;
    const float qx = in_vocab ? load_float(p.q, p.q_dtype, b * p.sq0 + t * p.sq1 + x * p.sq2) : 0.f;
    const bool hit = !bad && qx > 0.f && p.u[b * p.su0 + t * p.su1] * qx < px;
    p.match[row_id] = hit;
    p.tokens[row_id] = hit ? x : -1;
    p.stats[2 * row_id] = bad ? __int_as_float(0x7fc00000) : st.m;
    p.stats[2 * row_id + 1] = st.s;
  }
}

__global__ void __launch_bounds__(256) scales_kernel(const VerifyScalesParams p) {
  const int64_t b = blockIdx.x;
  int64_t run = 0;
  bool open = true;
  for (int s = 0; s < p.NS; ++s) {
    const int64_t lo = p.offsets[s], hi = p.offsets[s + 1];
    int64_t hits = 0;
    for (int64_t t0 = lo; t0 < hi; t0 += blockDim.x) {
      const int64_t t = t0 + threadIdx.x;
      hits += __syncthreads_count(t < hi && p.match[b * p.T + t]);
    }
    // Correctly rounded even under --use_fast_math (its '/' is approximate): a ratio exactly on the threshold
    // (50 of 100 at 0.5) is decided as on every other backend, float32 ratio >= float32 threshold.
    const float r = __fdiv_rn(static_cast<float>(hits), static_cast<float>(hi - lo));
    if (threadIdx.x == 0) p.ratio[b * p.NS + s] = r;
    open = open && (p.greedy ? r >= p.threshold : hits == hi - lo);
    run += open;
  }
  if (threadIdx.x == 0) p.accepted[b] = run;
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) {
    const int s = scale_of(p, t);
    if (s < run) p.tokens[b * p.T + t] = p.draft[b * p.sd0 + t * p.sd1];
    else if (s > run) p.tokens[b * p.T + t] = -1;
  }
}

template <typename T, int G> __global__ void __launch_bounds__(G == 32 ? 256 : G) redraw_kernel(const VerifyScalesParams p) {
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (row_id >= p.B * p.T) return;
  const int64_t b = row_id / p.T, t = row_id % p.T;
  const int s = scale_of(p, t);
  if (s != p.accepted[b] || p.match[row_id]) return;  // uniform over the group
  const float m = p.stats[2 * row_id], sum = p.stats[2 * row_id + 1];
  if (isnan(m)) {
    if (lane == 0) p.tokens[row_id] = -1;
    return;
  }
  const Row<T> row(p, b, t, s);
  const int64_t qrow = b * p.sq0 + t * p.sq1;
  auto prob = [&](int64_t v) { return __expf(row.at(v, p.sl2) * p.inv_temp - m) / sum; };
  auto resid = [&](int64_t v) {  // max(0, p − q), NaN → 0 (unchecked draft probabilities)
    const float d = prob(v) - load_float(p.q, p.q_dtype, qrow + v * p.sq2);
    return d > 0.f ? d : 0.f;
  };
  Sums acc{0.f, 0.f};
  for (int64_t v = lane; v < p.V; v += G) {
    acc.r += resid(v);
    acc.p += prob(v);
  }
  acc = group_reduce<G>(acc, [](Sums a, Sums c) { return Sums{a.r + c.r, a.p + c.p}; });
  const bool use_p = !(acc.r > 0.f);
  const float target = p.u[b * p.su0 + t * p.su1 + p.su2] * (use_p ? acc.p : acc.r);
  float cum = 0.f;
  int last = -1;
  for (int64_t v0 = 0; v0 < p.V; v0 += G) {
    const int64_t v = v0 + lane;
    const float w = v < p.V ? (use_p ? prob(v) : resid(v)) : 0.f;
    const float c = cum + group_scan<G>(w);
    MaxArg hit{w > 0.f ? static_cast<float>(v) : -1.f, (w > 0.f && c > target) ? static_cast<int>(v) : INT_MAX};
    hit = group_reduce<G>(hit, [](MaxArg a, MaxArg d) { return MaxArg{fmaxf(a.m, d.m), min(a.a, d.a)}; });
    last = max(last, static_cast<int>(hit.m));
    if (hit.a != INT_MAX) {
      if (lane == 0) p.tokens[row_id] = hit.a;
      return;
    }
    cum = group_reduce<G>(c, [](float a, float d) { return fmaxf(a, d); });
  }
  if (lane == 0) p.tokens[row_id] = last;
}

template <typename T, int G> cudaError_t launch_rows(const VerifyScalesParams& p, cudaStream_t stream) {
  const int threads = G == 32 ? 256 : G;
  const int64_t rows = p.B * p.T, per_block = threads / G;
  const unsigned blocks = static_cast<unsigned>((rows + per_block - 1) / per_block);
  rows_kernel<T, G><<<blocks, threads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scales_kernel<<<static_cast<unsigned>(p.B), 256, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.greedy) return err;
  redraw_kernel<T, G><<<blocks, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

LaunchStatus verify_scales_launch(const VerifyScalesParams& p, DType logits_dtype, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.B == 0 || p.T == 0) return 0;
  if (p.NS < 1 || p.NS > kVerifyMaxScales || p.V < 1 || p.V > INT_MAX) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t rows = p.B * p.T;
  STREAMKERN_DISPATCH_FLOAT(logits_dtype, T, {
    if (p.V <= 16384 && rows >= 4096) return static_cast<int>(launch_rows<T, 32>(p, stream));
    if (p.V >= 32768) return static_cast<int>(launch_rows<T, 1024>(p, stream));
    return static_cast<int>(launch_rows<T, 256>(p, stream));
  });
  return 0;
}

}  // namespace streamkern
