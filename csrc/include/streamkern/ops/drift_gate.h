// The drift gate ops attention_weighted_drift_, drift_gate_step_ and patch_importance_ (docs/contract.md §4.3): the
// torch-free parameters of the CUDA launchers (csrc/cuda/drift_gate.cu), and, outside nvcc, the op schemas and the
// checks their C++ entry points (csrc/cpu/drift_gate.cpp, csrc/cuda/drift_gate_binding.cpp) repeat for direct calls.
#pragma once
#include <cstdint>

#include "streamkern/common.h"

namespace streamkern {

// drift[b] = Σ_yx mean_c|avgpool(image)[b,c,y,x] − prev_small[b,c,y,x]| · dilated_weight(y, x); small = avgpool(image).
struct AttentionWeightedDriftParams {
  float* drift;             // [B] float32
  void* small;              // [B, C, h, w] contiguous, dtype small_dtype
  const void* image;        // [B, C, H, W] strided
  const void* prev_small;   // [B, C, h, w] strided, dtype small_dtype
  const float* importance;  // [B, gh, gw] strided
  int64_t B, C, h, w;
  int64_t si[4], sp[4], simp[3];  // strides (elements) of image, prev_small, importance
  int gh, gw, pool, dilation;
};

// DriftGate.should_recompute in one launch: grid (splits, B); block (split, b) pools its share of camera b's cells
// (drift terms too when there is a previous frame) and writes partial[b, split]; the last block to finish (counter,
// reset to 0 on exit) applies the state guard, averages the drift over the cameras and writes the decision.
struct DriftGateStepParams {
  AttentionWeightedDriftParams frame;  // frame.drift unused; prev_small/importance null on the first frame
  float* partial;             // [B, splits]
  int* counter;               // one int32, 0 between launches
  bool* recompute;
  int64_t* reason;
  float* drift;
  const void* state;          // [R, K] strided
  const void* prev_state;     // [R, K] contiguous, null before the first update
  int64_t state_rows, state_cols, ss[2];
  DType state_dtype;          // float32/float64/float16/bfloat16
  double drift_threshold, state_threshold;
  int splits;
};

// out[b] = m / (Σ m + 1e-8), m[v] = mean over l in [start, end), heads, the last A rows q of attn[l, b, head, q, v].
struct PatchImportanceParams {
  float* out;               // [B, V] contiguous
  float* workspace;         // [B, splits, V]
  const void* attn;         // [NL, B, H, S, S] strided
  int64_t B, H, S, V, A, start, end, splits;
  int64_t s[5];
};

// image_dtype: float32/float16/bfloat16 (small in the same dtype) or uint8 (small float32, values / 255).
LaunchStatus attention_weighted_drift_launch(const AttentionWeightedDriftParams& p, DType image_dtype, void* stream);
// Blocks per camera of drift_gate_step_launch (the size of DriftGateStepParams::partial is B × this).
int drift_gate_splits(int64_t h, int64_t w);
LaunchStatus drift_gate_step_launch(const DriftGateStepParams& p, DType image_dtype, void* stream);
LaunchStatus patch_importance_launch(const PatchImportanceParams& p, DType attn_dtype, void* stream);

}  // namespace streamkern

#if !defined(__CUDACC__)
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "streamkern/torch_utils.h"

namespace streamkern {

inline constexpr const char* kAttentionWeightedDriftSchema =
    "attention_weighted_drift_(Tensor(a!) drift, Tensor(b!) small, Tensor image, Tensor prev_small, "
    "Tensor importance, int pool, int dilation) -> ()";
inline constexpr const char* kDriftGateStepSchema =
    "drift_gate_step_(Tensor(a!) recompute, Tensor(b!) reason, Tensor(c!) drift, Tensor(d!) small, "
    "Tensor(e!) counter, Tensor image, Tensor? prev_small, Tensor? importance, Tensor state, Tensor? prev_state, "
    "int pool, int dilation, float drift_threshold, float state_threshold) -> ()";
inline constexpr const char* kPatchImportanceSchema =
    "patch_importance_(Tensor(a!) out, Tensor attn, int layer_start, int layer_end, int num_vision_tokens, "
    "int action_tokens) -> ()";

// The pooling half of the drift ops: image [B, C, H, W] with H, W multiples of pool, small its contiguous pooling.
inline void check_drift_image_args(const char* op, const at::Tensor& small, const at::Tensor& image, int64_t pool,
                                   int64_t dilation) {
  TORCH_CHECK(image.dim() == 4 && pool >= 1 && image.size(2) % pool == 0 && image.size(3) % pool == 0, op,
              ": image must be [B, C, H, W] with H, W multiples of pool");
  TORCH_CHECK(small.is_contiguous() && small.dim() == 4 && small.size(0) == image.size(0) &&
                  small.size(1) == image.size(1) && small.size(2) == image.size(2) / pool &&
                  small.size(3) == image.size(3) / pool,
              op, ": small must be contiguous [B, C, H/pool, W/pool]");
  TORCH_CHECK(small.scalar_type() == (image.scalar_type() == at::kByte ? at::kFloat : image.scalar_type()), op,
              ": small must be float32 for uint8 images, else the image's dtype");
  TORCH_CHECK(dilation >= 1 && dilation % 2 == 1, op, ": dilation must be odd and positive");
}

// The previous frame of the drift ops: prev_small like small, importance float32 [B, gh, gw].
inline void check_drift_prev_args(const char* op, const at::Tensor& small, const at::Tensor& prev_small,
                                  const at::Tensor& importance) {
  TORCH_CHECK(prev_small.sizes() == small.sizes() && prev_small.scalar_type() == small.scalar_type(), op,
              ": prev_small must match small");
  TORCH_CHECK(importance.dim() == 3 && importance.size(0) == small.size(0) && importance.size(1) >= 1 &&
                  importance.size(2) >= 1 && importance.scalar_type() == at::kFloat,
              op, ": importance must be float32 [B, gh >= 1, gw >= 1]");
}

inline void check_weighted_drift_args(const at::Tensor& drift, const at::Tensor& small, const at::Tensor& image,
                                      const at::Tensor& prev_small, const at::Tensor& importance, int64_t pool,
                                      int64_t dilation) {
  check_drift_image_args("attention_weighted_drift_", small, image, pool, dilation);
  check_drift_prev_args("attention_weighted_drift_", small, prev_small, importance);
  TORCH_CHECK(drift.is_contiguous() && drift.scalar_type() == at::kFloat && drift.numel() == image.size(0),
              "attention_weighted_drift_: drift must be contiguous float32 [B]");
}

// state [R, K] (any strides) and prev_state its contiguous copy, one floating dtype; 0-d bool/int64/float32
// outputs; counter a 1-element int32 tensor.
inline void check_gate_step_args(const at::Tensor& recompute, const at::Tensor& reason, const at::Tensor& drift,
                                 const at::Tensor& small, const at::Tensor& counter, const at::Tensor& image,
                                 const std::optional<at::Tensor>& prev_small,
                                 const std::optional<at::Tensor>& importance, const at::Tensor& state,
                                 const std::optional<at::Tensor>& prev_state, int64_t pool, int64_t dilation) {
  constexpr const char* op = "drift_gate_step_";
  check_drift_image_args(op, small, image, pool, dilation);
  TORCH_CHECK(image.size(0) >= 1, op, ": image must hold at least one camera");
  TORCH_CHECK(prev_small.has_value() == importance.has_value(), op,
              ": prev_small and importance come together or not at all");
  if (prev_small.has_value()) check_drift_prev_args(op, small, *prev_small, *importance);
  TORCH_CHECK(recompute.dim() == 0 && recompute.scalar_type() == at::kBool && reason.dim() == 0 &&
                  reason.scalar_type() == at::kLong && drift.dim() == 0 && drift.scalar_type() == at::kFloat,
              op, ": outputs must be 0-d bool, int64 and float32 tensors");
  TORCH_CHECK(counter.numel() == 1 && counter.scalar_type() == at::kInt, op, ": counter must be one int32");
  TORCH_CHECK(state.dim() == 2 && state.numel() >= 1 && at::isFloatingType(state.scalar_type()), op,
              ": state must be a non-empty floating-point [R, K] tensor");
  for (const at::Tensor* t : {&recompute, &reason, &drift, &small, &counter, &state})
    TORCH_CHECK(t->device() == image.device(), op, ": every tensor must be on the image's device");
  for (const std::optional<at::Tensor>* t : {&prev_small, &importance, &prev_state})
    TORCH_CHECK(!t->has_value() || (*t)->device() == image.device(), op,
                ": every tensor must be on the image's device");
  if (prev_state.has_value())
    TORCH_CHECK(prev_state->is_contiguous() && prev_state->sizes() == state.sizes() &&
                    prev_state->scalar_type() == state.scalar_type(),
                op, ": prev_state must be a contiguous tensor of state's shape and dtype");
}

inline void check_patch_importance_args(const at::Tensor& out, const at::Tensor& attn, int64_t start, int64_t end,
                                        int64_t V, int64_t A) {
  TORCH_CHECK(attn.dim() == 5 && attn.size(3) == attn.size(4), "patch_importance_: attn must be [NL, B, H, S, S]");
  TORCH_CHECK(0 <= start && start < end && end <= attn.size(0) && 1 <= V && V <= attn.size(4) && 1 <= A &&
                  A <= attn.size(3),
              "patch_importance_: layer range, V or A out of bounds");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.numel() == attn.size(1) * V,
              "patch_importance_: out must be contiguous float32 [B, gh, gw] with gh * gw = V");
}

// The pooling (and, with a previous frame, drift) half shared by attention_weighted_drift_ and drift_gate_step_.
inline AttentionWeightedDriftParams drift_frame_params(at::Tensor& small, const at::Tensor& image, const at::Tensor* prev_small,
                                              const at::Tensor* importance, int64_t pool, int64_t dilation) {
  AttentionWeightedDriftParams p{};
  p.small = small.data_ptr();
  p.image = image.data_ptr();
  p.B = image.size(0);
  p.C = image.size(1);
  p.h = small.size(2);
  p.w = small.size(3);
  for (int i = 0; i < 4; ++i) p.si[i] = image.stride(i);
  if (prev_small != nullptr) {
    p.prev_small = prev_small->data_ptr();
    p.importance = importance->data_ptr<float>();
    for (int i = 0; i < 4; ++i) p.sp[i] = prev_small->stride(i);
    for (int i = 0; i < 3; ++i) p.simp[i] = importance->stride(i);
    p.gh = static_cast<int>(importance->size(1));
    p.gw = static_cast<int>(importance->size(2));
  }
  p.pool = static_cast<int>(pool);
  p.dilation = static_cast<int>(dilation);
  return p;
}

inline AttentionWeightedDriftParams attention_weighted_drift_params(at::Tensor& drift, at::Tensor& small,
                                                           const at::Tensor& image, const at::Tensor& prev_small,
                                                           const at::Tensor& importance, int64_t pool,
                                                           int64_t dilation) {
  check_weighted_drift_args(drift, small, image, prev_small, importance, pool, dilation);
  AttentionWeightedDriftParams p = drift_frame_params(small, image, &prev_small, &importance, pool, dilation);
  p.drift = drift.data_ptr<float>();
  return p;
}

// Everything but the launch shape (splits) and its partial-drift buffer, which the launcher's side decides.
inline DriftGateStepParams drift_gate_step_params(at::Tensor& recompute, at::Tensor& reason, at::Tensor& drift,
                                              at::Tensor& small, at::Tensor& counter, const at::Tensor& image,
                                              const std::optional<at::Tensor>& prev_small,
                                              const std::optional<at::Tensor>& importance, const at::Tensor& state,
                                              const std::optional<at::Tensor>& prev_state, int64_t pool,
                                              int64_t dilation, double drift_threshold, double state_threshold) {
  check_gate_step_args(recompute, reason, drift, small, counter, image, prev_small, importance, state, prev_state,
                       pool, dilation);
  DriftGateStepParams g{};
  g.frame = drift_frame_params(small, image, prev_small ? &*prev_small : nullptr,
                               importance ? &*importance : nullptr, pool, dilation);
  g.counter = counter.data_ptr<int>();
  g.recompute = recompute.data_ptr<bool>();
  g.reason = reason.data_ptr<int64_t>();
  g.drift = drift.data_ptr<float>();
  g.state = state.data_ptr();
  g.prev_state = prev_state ? prev_state->data_ptr() : nullptr;
  g.state_rows = state.size(0);
  g.state_cols = state.size(1);
  g.ss[0] = state.stride(0);
  g.ss[1] = state.stride(1);
  g.state_dtype = dtype_of(state);
  g.drift_threshold = drift_threshold;
  g.state_threshold = state_threshold;
  return g;
}

}  // namespace streamkern
#endif  // !__CUDACC__
