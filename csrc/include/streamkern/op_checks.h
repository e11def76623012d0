// Checks that the C++ entry points of each op repeat, shared by its CPU kernel and its CUDA binding. The Python
// layer has already validated every argument with a clear message; these guard direct calls of
// torch.ops.streamkern_C.* so that no kernel ever runs on arguments it would read or write out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

namespace streamkern {

inline void check_consensus_args(const at::Tensor& out, const at::Tensor& chunk_k, const at::Tensor& text_k,
                                 const at::Tensor& entity_weights, int64_t frame_seq_len, at::IntArrayRef layers,
                                 at::ArrayRef<double> layer_weights) {
  TORCH_CHECK(chunk_k.dim() == 5 && text_k.dim() == 5, "consensus_frame_scores_: chunk_k and text_k must be 5-d");
  TORCH_CHECK(chunk_k.scalar_type() == text_k.scalar_type(), "consensus_frame_scores_: chunk_k/text_k dtype mismatch");
  const int64_t NL = chunk_k.size(0), B = chunk_k.size(1), L = chunk_k.size(2);
  TORCH_CHECK(text_k.size(0) == NL && text_k.size(1) == B && text_k.size(3) == chunk_k.size(3) &&
                  text_k.size(4) == chunk_k.size(4),
              "consensus_frame_scores_: text_k ", text_k.sizes(), " does not match chunk_k ", chunk_k.sizes());
  const int64_t S = text_k.size(2);
  TORCH_CHECK(entity_weights.dim() == 1 ? entity_weights.size(0) == S
                                        : entity_weights.dim() == 2 && entity_weights.size(0) == B &&
                                              entity_weights.size(1) == S,
              "consensus_frame_scores_: entity_weights must be [S] or [B, S], got ", entity_weights.sizes());
  TORCH_CHECK(frame_seq_len >= 1 && L % frame_seq_len == 0, "consensus_frame_scores_: frame_seq_len must divide L");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == B &&
                  out.size(1) == L / frame_seq_len,
              "consensus_frame_scores_: out must be a contiguous float32 [B, F] tensor");
  TORCH_CHECK(!layers.empty() && layers.size() == layer_weights.size(),
              "consensus_frame_scores_: layers and layer_weights must be non-empty and of equal length");
  for (const int64_t l : layers) TORCH_CHECK(l >= 0 && l < NL, "consensus_frame_scores_: layer ", l, " out of range");
}

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

inline void check_verify_scales_args(const at::Tensor& accepted, const at::Tensor& match, const at::Tensor& ratio,
                                     const at::Tensor& tokens, const at::Tensor& stats, const at::Tensor& logits,
                                     const at::Tensor& draft_tokens, const c10::optional<at::Tensor>& draft_probs,
                                     const c10::optional<at::Tensor>& uniforms, at::IntArrayRef offsets,
                                     c10::optional<at::ArrayRef<double>> cfg, bool greedy) {
  TORCH_CHECK(logits.dim() == 3 && draft_tokens.dim() == 2, "verify_scales_: logits [B or 2B, T, V], draft [B, T]");
  const int64_t B = draft_tokens.size(0), T = draft_tokens.size(1), V = logits.size(2);
  const int64_t NS = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(NS >= 1 && offsets.back() == T, "verify_scales_: bad offsets");
  TORCH_CHECK(logits.size(0) == (cfg.has_value() ? 2 * B : B) && logits.size(1) == T,
              "verify_scales_: logits ", logits.sizes(), " do not match draft_tokens ", draft_tokens.sizes());
  TORCH_CHECK(!cfg.has_value() || static_cast<int64_t>(cfg->size()) == NS, "verify_scales_: cfg length");
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong, "verify_scales_: draft_tokens must be int64");
  TORCH_CHECK(greedy || (draft_probs.has_value() && draft_probs->dim() == 3 && draft_probs->size(0) == B &&
                         draft_probs->size(1) == T && draft_probs->size(2) == V && uniforms.has_value() &&
                         uniforms->dim() == 3 && uniforms->size(0) == B && uniforms->size(1) == T &&
                         uniforms->size(2) == 2 && uniforms->scalar_type() == at::kFloat),
              "verify_scales_: sample mode needs draft_probs [B, T, V] and float32 uniforms [B, T, 2]");
  for (const at::Tensor* out : {&accepted, &match, &ratio, &tokens})
    TORCH_CHECK(out->is_contiguous() && out->device() == logits.device(), "verify_scales_: outputs must be contiguous");
  TORCH_CHECK(greedy || (stats.is_contiguous() && stats.numel() == 2 * B * T), "verify_scales_: stats [B, T, 2]");
}

}  // namespace streamkern
