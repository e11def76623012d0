// Drift gate CUDA kernels.
//
// attention_weighted_drift: one block per batch row (camera). The block's threads stride over the h·w cells of the
// pooled grid; a thread pools its cell for every channel (pool×pool strided loads; neighbouring threads read
// neighbouring column segments, so a warp's loads coalesce), writes small, and multiplies mean_c|Δ| by the dilated
// bilinear weight (d² taps of the gh×gw map, L1-resident). A fixed-order block reduction writes drift[b]: no atomics,
// no zeroed buffer, one launch, bit-reproducible decisions. At 3×224×224 a block reads 150k elements per camera.
//
// drift_gate: DriftGate.should_recompute in one launch. Grid (splits, B), a thread per pooled cell as above, each
// block writes the partial drift of its cells; the last block to arrive (an atomic counter that it resets to 0)
// reduces the state guard's max |Δstate| over its threads, sums the partials in a fixed order and writes the
// decision. Nothing is read back to the host and nothing needs zeroing between steps.
//
// patch_importance: kernel 1, grid (B, splits): each block sums its share of the (layer, head, action row) rows of
// the slice for all V columns (threads over columns, coalesced along the key axis) into workspace[b, split, :];
// kernel 2, grid B: sums the splits, scales by 1/(L·H·A), normalises by the row sum + 1e-8.
#include "streamkern/ops/drift_gate.h"
#include "streamkern/cuda_utils.cuh"
#include "streamkern/drift_gate_math.h"

namespace streamkern {
namespace {

constexpr int kThreads = 256;

struct Sum {
  template <typename F> __device__ F operator()(F a, F b) const { return a + b; }
};
struct NanMax {
  template <typename F> __device__ F operator()(F a, F b) const { return nan_max(a, b); }
};

// Fixed-order reduction over the block: warp shuffles, then the first warp over the warp results. Result in
// thread 0; `scratch` holds 32 values and is free again when every thread has returned.
template <typename F, typename Op>
__device__ F block_reduce(F v, F identity, F* scratch, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? scratch[lane] : identity;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

__device__ float block_sum(float v, float* scratch) { return block_reduce(v, 0.f, scratch, Sum{}); }

// Pools cell e of camera b for every channel and writes small; returns mean_c |small − prev_small| (0 when there
// is no previous frame).
template <typename T, typename S>
__device__ float pool_cell(const AttentionWeightedDriftParams& p, int64_t b, int64_t e, float inv) {
  const int64_t y = e / p.w, x = e % p.w;
  const T* src = static_cast<const T*>(p.image) + b * p.si[0] + y * p.pool * p.si[2] + x * p.pool * p.si[3];
  S* out = static_cast<S*>(p.small) + b * p.C * p.h * p.w + e;
  const S* prev = p.prev_small == nullptr
                      ? nullptr
                      : static_cast<const S*>(p.prev_small) + b * p.sp[0] + y * p.sp[2] + x * p.sp[3];
  float diff = 0.f;
  for (int64_t c = 0; c < p.C; ++c) {
    float acc = 0.f;
    for (int r = 0; r < p.pool; ++r)
      for (int s = 0; s < p.pool; ++s) acc += to_float(src[c * p.si[1] + r * p.si[2] + s * p.si[3]]);
    const float v = acc * inv;
    out[c * p.h * p.w] = from_float<S>(v);
    if (prev != nullptr) diff += fabsf(v - to_float(prev[c * p.sp[1]]));
  }
  return diff / static_cast<float>(p.C);
}

constexpr int64_t kStagedCells = 4096;

// max over the (2r+1)² window of the staged up-sampled map, in-range taps only.
__device__ float staged_dilated(const float* up, int64_t h, int64_t w, int64_t y, int64_t x, int r) {
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t yy = y - r < 0 ? 0 : y - r; yy <= (y + r >= h ? h - 1 : y + r); ++yy)
    for (int64_t xx = x - r < 0 ? 0 : x - r; xx <= (x + r >= w ? w - 1 : x + r); ++xx)
      best = nan_max(best, up[yy * w + xx]);
  return best;
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) weighted_drift_kernel(AttentionWeightedDriftParams p, float scale) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x;
  const ImportanceMap map{p.importance + b * p.simp[0], p.simp[1], p.simp[2], p.gh, p.gw};
  const float inv = scale / static_cast<float>(p.pool * p.pool);
  // Up-sampled map staged in shared memory when it fits (the 28×28 grid of a 224² image does), so each cell's
  // dilation is d² shared loads; larger grids recompute the bilinear taps per window position.
  __shared__ float up[kStagedCells];
  const bool staged = p.h * p.w <= kStagedCells;
  if (staged) {
    for (int64_t e = threadIdx.x; e < p.h * p.w; e += blockDim.x)
      up[e] = upsampled(map, static_cast<int>(p.h), static_cast<int>(p.w), static_cast<int>(e / p.w),
                        static_cast<int>(e % p.w));
    __syncthreads();
  }
  float total = 0.f;
  for (int64_t e = threadIdx.x; e < p.h * p.w; e += blockDim.x) {
    const int64_t y = e / p.w, x = e % p.w;
    const float weight =
        staged ? staged_dilated(up, p.h, p.w, y, x, p.dilation / 2)
               : dilated_weight(map, static_cast<int>(p.h), static_cast<int>(p.w), static_cast<int>(y),
                                static_cast<int>(x), p.dilation);
    total += pool_cell<T, S>(p, b, e, inv) * weight;
  }
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) p.drift[b] = total;
}

// |state − prev_state| at flat index i, rounded to the state's dtype as PyTorch rounds it (the double difference of
// two values of a narrower type rounds to that type exactly like its own subtraction), widened to double.
template <typename T>
__device__ double state_diff_as(const DriftGateStepParams& g, int64_t r, int64_t k) {
  const double a = static_cast<const T*>(g.state)[r * g.ss[0] + k * g.ss[1]];
  const double b = static_cast<const T*>(g.prev_state)[r * g.state_cols + k];
  return fabs(static_cast<double>(static_cast<T>(a - b)));
}

template <typename T>
__device__ double state_diff_narrow(const DriftGateStepParams& g, int64_t r, int64_t k) {
  const float a = to_float(static_cast<const T*>(g.state)[r * g.ss[0] + k * g.ss[1]]);
  const float b = to_float(static_cast<const T*>(g.prev_state)[r * g.state_cols + k]);
  return fabs(static_cast<double>(to_float(from_float<T>(a - b))));
}

__device__ double state_diff_at(const DriftGateStepParams& g, int64_t i) {
  const int64_t r = i / g.state_cols, k = i % g.state_cols;
  switch (g.state_dtype) {
    case DType::kFloat64: return state_diff_as<double>(g, r, k);
    case DType::kFloat16: return state_diff_narrow<__half>(g, r, k);
    case DType::kBFloat16: return state_diff_narrow<__nv_bfloat16>(g, r, k);
    default: return state_diff_as<float>(g, r, k);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) drift_gate_kernel(DriftGateStepParams g, float scale) {
  __shared__ float scratch[32];
  __shared__ double dscratch[32];
  __shared__ bool last;
  const AttentionWeightedDriftParams& p = g.frame;
  const bool has_frame = p.prev_small != nullptr, has_state = g.prev_state != nullptr;
  const int64_t b = blockIdx.y, split = blockIdx.x, hw = p.h * p.w;
  const float inv = scale / static_cast<float>(p.pool * p.pool);
  float total = 0.f;
  for (int64_t e = hw * split / g.splits + threadIdx.x; e < hw * (split + 1) / g.splits; e += blockDim.x) {
    const float diff = pool_cell<T, S>(p, b, e, inv);
    if (has_frame) {
      const ImportanceMap map{p.importance + b * p.simp[0], p.simp[1], p.simp[2], p.gh, p.gw};
      total += diff * dilated_weight(map, static_cast<int>(p.h), static_cast<int>(p.w), static_cast<int>(e / p.w),
                                     static_cast<int>(e % p.w), p.dilation);
    }
  }
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) {
    g.partial[b * g.splits + split] = total;
    __threadfence();
    last = atomicAdd(g.counter, 1) == static_cast<int>(gridDim.x * gridDim.y) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double state_diff = -std::numeric_limits<double>::infinity();
  if (has_state)
    for (int64_t i = threadIdx.x; i < g.state_rows * g.state_cols; i += blockDim.x)
      state_diff = nan_max(state_diff, state_diff_at(g, i));
  state_diff = block_reduce(state_diff, -std::numeric_limits<double>::infinity(), dscratch, NanMax{});
  if (threadIdx.x != 0) return;
  float sum = 0.f;
  for (int64_t cam = 0; cam < p.B; ++cam) {
    float d = 0.f;
    for (int k = 0; k < g.splits; ++k) d += __ldcg(g.partial + cam * g.splits + k);
    sum += d;
  }
  // __fdiv_rn: correctly rounded under --use_fast_math too (its '/' is approximate), as the decision's input.
  const GateOutcome o = gate_decision(has_frame, __fdiv_rn(sum, static_cast<float>(p.B)), g.drift_threshold,
                                      has_state, state_diff, g.state_threshold);
  *g.recompute = o.recompute;
  *g.reason = o.reason;
  *g.drift = o.drift;
  *g.counter = 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) importance_partial_kernel(PatchImportanceParams p) {
  const int64_t b = blockIdx.x, split = blockIdx.y;
  const int64_t rows = (p.end - p.start) * p.H * p.A;
  const int64_t r0 = rows * split / p.splits, r1 = rows * (split + 1) / p.splits;
  const T* a = static_cast<const T*>(p.attn) + b * p.s[1];
  for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x) {
    float acc = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t l = p.start + r / (p.H * p.A), hd = (r / p.A) % p.H, q = p.S - p.A + r % p.A;
      acc += to_float(a[l * p.s[0] + hd * p.s[2] + q * p.s[3] + v * p.s[4]]);
    }
    p.workspace[(b * p.splits + split) * p.V + v] = acc;
  }
}

__global__ void __launch_bounds__(kThreads) importance_finish_kernel(PatchImportanceParams p) {
  __shared__ float scratch[32];
  __shared__ float denom;
  const int64_t b = blockIdx.x;
  const float inv = 1.f / static_cast<float>((p.end - p.start) * p.H * p.A);
  float local = 0.f;
  for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x) {
    float m = 0.f;
    for (int64_t k = 0; k < p.splits; ++k) m += p.workspace[(b * p.splits + k) * p.V + v];
    m *= inv;
    p.out[b * p.V + v] = m;
    local += m;
  }
  const float total = block_sum(local, scratch);
  if (threadIdx.x == 0) denom = total + 1e-8f;
  __syncthreads();
  for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x) p.out[b * p.V + v] /= denom;
}

struct WeightedDriftKernel {
  template <typename T, typename S>
  static void launch(dim3 grid, cudaStream_t stream, const AttentionWeightedDriftParams& p, float scale) {
    weighted_drift_kernel<T, S><<<grid, kThreads, 0, stream>>>(p, scale);
  }
};

struct DriftGateKernel {
  template <typename T, typename S>
  static void launch(dim3 grid, cudaStream_t stream, const DriftGateStepParams& p, float scale) {
    drift_gate_kernel<T, S><<<grid, kThreads, 0, stream>>>(p, scale);
  }
};

// K::launch<T, S> for the image dtype: float32/float16/bfloat16 images pool into their own type, uint8 frames into
// float32 with values scaled by 1/255.
template <typename K, typename Params>
LaunchStatus launch_on_image_dtype(DType image_dtype, dim3 grid, cudaStream_t stream, const Params& p) {
  switch (image_dtype) {
    case DType::kFloat32: K::template launch<float, float>(grid, stream, p, 1.f); break;
    case DType::kFloat16: K::template launch<__half, __half>(grid, stream, p, 1.f); break;
    case DType::kBFloat16: K::template launch<__nv_bfloat16, __nv_bfloat16>(grid, stream, p, 1.f); break;
    case DType::kUInt8: K::template launch<uint8_t, float>(grid, stream, p, 1.f / 255.f); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

LaunchStatus attention_weighted_drift_launch(const AttentionWeightedDriftParams& p, DType image_dtype, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.B == 0) return 0;
  return launch_on_image_dtype<WeightedDriftKernel>(image_dtype, dim3(static_cast<unsigned>(p.B)), stream, p);
}

int drift_gate_splits(int64_t h, int64_t w) {
  const int64_t blocks = (h * w + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

LaunchStatus drift_gate_step_launch(const DriftGateStepParams& p, DType image_dtype, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(p.frame.B));
  return launch_on_image_dtype<DriftGateKernel>(image_dtype, grid, stream, p);
}

LaunchStatus patch_importance_launch(const PatchImportanceParams& p, DType attn_dtype, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.B == 0) return 0;
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(p.splits));
  STREAMKERN_DISPATCH_FLOAT(attn_dtype, T, importance_partial_kernel<T><<<grid, kThreads, 0, stream>>>(p));
  importance_finish_kernel<<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace streamkern
