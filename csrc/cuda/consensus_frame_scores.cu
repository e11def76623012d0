// Consensus frame scoring on the GPU: one launch over (token split × H·D slice, batch row, selected layer).
//
// A block owns a slice of kWidth elements of the flattened H·D axis (kLanes lanes × one 16-byte vector each)
// for one (layer, batch row) and a contiguous token range. Its 256 threads form kGroups groups of kLanes lanes;
// a group reads one key row slice (kLanes × 16 contiguous bytes) at a time.
//   1. q slice = Σ_s w[s]·text[s, slice] / (Σ_s w[s] + 1e-8): groups stride over S, then a shared-memory sum.
//   2. each group streams the block's tokens (kUnroll rows in flight), keeping a per-lane partial of k·q for the
//      frame it is in; when any group of the warp enters a new frame the warp reduces its groups' partials and
//      lane 0 of each group adds λ·norm·partial atomically into out[b, frame].
// Every chunk key is read once; the text slice is re-read once per token split (the host bounds the splits).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "streamkern/cuda_utils.cuh"
#include "streamkern/ops/consensus_frame_scores.h"

namespace streamkern {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 8;                    // lanes per key row slice: 8 × 16 B = one 128-byte line
constexpr int kGroups = kThreads / kLanes;   // rows in flight per unrolled step
constexpr int kUnroll = 4;
constexpr int kMaxLayers = 64;
constexpr unsigned kFull = 0xffffffffu;

struct LayerTable {
  int32_t count;
  int64_t ids[kMaxLayers];
  float scale[kMaxLayers];  // λ_i / (H·√D·fsl)
};

__device__ __forceinline__ float load_weight(const void* w, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(w)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]);
    default: return static_cast<const float*>(w)[i];
  }
}

// The kVec<T> elements [hd0, hd0 + kVec) of one [H, D] row (zeros past H·D).
template <typename T, bool kVector>
__device__ __forceinline__ void load_slice(const T* row, int64_t hd0, int64_t HD, int64_t D, int64_t sh, int64_t sd,
                                           float (&x)[kVec<T>]) {
  if constexpr (kVector) {  // row contiguous over H·D, 16-byte aligned, HD % kVec == 0
    if (hd0 < HD) {
      const Vec16<T> v = Vec16<T>::load(row + hd0);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) x[j] = to_float(v.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) x[j] = 0.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec<T>; ++j) {
      const int64_t hd = hd0 + j;
      const int64_t h = hd / D;
      x[j] = hd < HD ? to_float(row[h * sh + (hd - h * D) * sd]) : 0.f;
    }
  }
}

__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off, kLanes);
  return v;
}

__device__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) s += smem[w];
  return s;
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    consensus_frame_scores_kernel(const ConsensusFrameScoresParams p, const __grid_constant__ LayerTable table,
                                  int64_t n_slices, int64_t tokens_per_split) {
  constexpr int V = kVec<T>;
  constexpr int kWidth = kLanes * V;
  __shared__ float partial[kGroups][kWidth];
  __shared__ float q_slice[kWidth];
  __shared__ float warp_sums[kThreads / 32];

  const int64_t slice = blockIdx.x % n_slices;
  const int64_t split = blockIdx.x / n_slices;
  const int64_t b = blockIdx.y;
  const int64_t layer = table.ids[blockIdx.z];
  const float scale = table.scale[blockIdx.z];
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const int64_t HD = p.H * p.D;
  const int64_t hd0 = slice * kWidth + lane * V;

  // 1. q slice
  const int64_t wrow = b * p.weights_stride_b;
  float wpart = 0.f;
  for (int64_t s = threadIdx.x; s < p.S; s += kThreads)
    wpart += load_weight(p.weights, p.weights_dtype, wrow + s * p.weights_stride_s);
  const float inv = 1.f / (block_sum(wpart, warp_sums) + 1e-8f);

  const T* text = static_cast<const T*>(p.text) + layer * p.text_stride[0] + b * p.text_stride[1];
  float q[V];
#pragma unroll
  for (int j = 0; j < V; ++j) q[j] = 0.f;
#pragma unroll 4
  for (int64_t s = group; s < p.S; s += kGroups) {
    const float w = load_weight(p.weights, p.weights_dtype, wrow + s * p.weights_stride_s);
    float x[V];
    load_slice<T, kVector>(text + s * p.text_stride[2], hd0, HD, p.D, p.text_stride[3], p.text_stride[4], x);
#pragma unroll
    for (int j = 0; j < V; ++j) q[j] = fmaf(w, x[j], q[j]);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) partial[group][lane * V + j] = q[j];
  __syncthreads();
  for (int c = threadIdx.x; c < kWidth; c += kThreads) {
    float s = 0.f;
#pragma unroll 8
    for (int g = 0; g < kGroups; ++g) s += partial[g][c];
    q_slice[c] = s * inv;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < V; ++j) q[j] = q_slice[lane * V + j];

  // 2. this split's tokens, frame by frame
  const T* chunk = static_cast<const T*>(p.chunk) + layer * p.chunk_stride[0] + b * p.chunk_stride[1];
  const int64_t F = p.L / p.frame_seq_len;
  float* out = p.out + b * F;
  const int64_t t0 = split * tokens_per_split;
  const int64_t t1 = t0 + tokens_per_split < p.L ? t0 + tokens_per_split : p.L;
  float acc = 0.f;
  int64_t frame = -1;     // the frame `acc` belongs to
  int64_t t_frame = 0;    // the frame of this group's latest token, valid below t_frame_end
  int64_t t_frame_end = 0;  // (no division per token: a group's tokens only increase)
  for (int64_t base = t0; base < t1; base += kGroups * kUnroll) {
    float x[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = base + u * kGroups + group;
      if (t < t1) {
        load_slice<T, kVector>(chunk + t * p.chunk_stride[2], hd0, HD, p.D, p.chunk_stride[3], p.chunk_stride[4],
                               x[u]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) x[u][j] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = base + u * kGroups + group;
      const bool valid = t < t1;
      if (valid && t >= t_frame_end) {
        t_frame = t / p.frame_seq_len;
        t_frame_end = (t_frame + 1) * p.frame_seq_len;
      }
      const int64_t f = valid ? t_frame : frame;
      if (__any_sync(kFull, frame >= 0 && f != frame)) {
        const float r = group_sum(acc);
        if (lane == 0 && frame >= 0) atomicAdd(out + frame, r * scale);
        acc = 0.f;
      }
      if (valid) {
        frame = f;
#pragma unroll
        for (int j = 0; j < V; ++j) acc = fmaf(x[u][j], q[j], acc);
      }
    }
  }
  const float r = group_sum(acc);
  if (lane == 0 && frame >= 0) atomicAdd(out + frame, r * scale);
}

bool aligned16_host(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// 16-byte vector loads are valid when every [H, D] row is one contiguous, 16-byte aligned run of H·D elements.
bool vector_ok(const void* base, const int64_t* st, int64_t H, int64_t D, int64_t elem, int64_t vec) {
  const bool flat = st[4] == 1 && (st[3] == D || H == 1);
  const bool strides = (st[0] * elem) % 16 == 0 && (st[1] * elem) % 16 == 0 && (st[2] * elem) % 16 == 0;
  return flat && strides && (H * D) % vec == 0 && aligned16_host(base);
}

template <typename T>
LaunchStatus launch_typed(const ConsensusFrameScoresParams& p, cudaStream_t stream) {
  constexpr int64_t V = kVec<T>;
  const int64_t HD = p.H * p.D;
  const int64_t n_slices = (HD + kLanes * V - 1) / (kLanes * V);
  int device = 0, sms = 132;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Enough blocks for ~4 per SM, but each split keeps >= 2·S tokens (and one unrolled step) so that the
  // text-slice re-reads stay well under the chunk reads.
  const int64_t per_split = static_cast<int64_t>(p.num_layers) * p.B * n_slices;
  const int64_t wanted = (4 * static_cast<int64_t>(sms) + per_split - 1) / per_split;
  const int64_t most = std::max<int64_t>(1, p.L / std::max<int64_t>(2 * p.S, kGroups * kUnroll));
  int64_t splits = std::max<int64_t>(1, std::min(wanted, most));
  const int64_t tokens_per_split = (p.L + splits - 1) / splits;
  splits = (p.L + tokens_per_split - 1) / tokens_per_split;
  if (p.B > 65535 || n_slices * splits > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);

  const bool vec = vector_ok(p.chunk, p.chunk_stride, p.H, p.D, sizeof(T), V) &&
                   vector_ok(p.text, p.text_stride, p.H, p.D, sizeof(T), V);
  const double norm = 1.0 / (static_cast<double>(p.H) * std::sqrt(static_cast<double>(p.D)) *
                             static_cast<double>(p.frame_seq_len));
  for (int32_t first = 0; first < p.num_layers; first += kMaxLayers) {
    LayerTable table{};
    table.count = std::min<int32_t>(kMaxLayers, p.num_layers - first);
    for (int32_t i = 0; i < table.count; ++i) {
      table.ids[i] = p.layers[first + i];
      table.scale[i] = static_cast<float>(p.layer_weights[first + i] * norm);
    }
    const dim3 grid(static_cast<unsigned>(n_slices * splits), static_cast<unsigned>(p.B),
                    static_cast<unsigned>(table.count));
    if (vec) {
      consensus_frame_scores_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, table, n_slices, tokens_per_split);
    } else {
      consensus_frame_scores_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, table, n_slices, tokens_per_split);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

LaunchStatus consensus_frame_scores_launch(const ConsensusFrameScoresParams& p, DType dtype, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.num_layers <= 0 || p.frame_seq_len <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t F = p.L / p.frame_seq_len;
  if (p.B * F == 0) return 0;
  const cudaError_t zero = cudaMemsetAsync(p.out, 0, static_cast<size_t>(p.B * F) * sizeof(float), stream);
  if (zero != cudaSuccess || p.H * p.D == 0) return static_cast<int>(zero);  // no H·D elements: all scores 0
  LaunchStatus status = 0;
  STREAMKERN_DISPATCH_FLOAT(dtype, T, status = launch_typed<T>(p, stream));
  return status;
}

}  // namespace streamkern
