// Checks that the C++ entry points of each op repeat, shared by its CPU kernel and its CUDA binding. The Python
// layer has already validated every argument with a clear message; these guard direct calls of
// torch.ops.streamkern_C.* so that no kernel ever runs on arguments it would read or write out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace streamkern {

inline void check_consensus_args(const at::Tensor& out, const at::Tensor& chunk_k, const at::Tensor& text_k,
                                 const at::Tensor& entity_weights, int64_t frame_seq_len, at::IntArrayRef layers,
                                 at::ArrayRef<double> layer_weights) {
  TORCH_CHECK(chunk_k.dim() == 5 && text_k.dim() == 5, "consensus_scores_: chunk_k and text_k must be 5-d");
  TORCH_CHECK(chunk_k.scalar_type() == text_k.scalar_type(), "consensus_scores_: chunk_k/text_k dtype mismatch");
  const int64_t NL = chunk_k.size(0), B = chunk_k.size(1), L = chunk_k.size(2);
  TORCH_CHECK(text_k.size(0) == NL && text_k.size(1) == B && text_k.size(3) == chunk_k.size(3) &&
                  text_k.size(4) == chunk_k.size(4),
              "consensus_scores_: text_k ", text_k.sizes(), " does not match chunk_k ", chunk_k.sizes());
  const int64_t S = text_k.size(2);
  TORCH_CHECK(entity_weights.dim() == 1 ? entity_weights.size(0) == S
                                        : entity_weights.dim() == 2 && entity_weights.size(0) == B &&
                                              entity_weights.size(1) == S,
              "consensus_scores_: entity_weights must be [S] or [B, S], got ", entity_weights.sizes());
  TORCH_CHECK(frame_seq_len >= 1 && L % frame_seq_len == 0, "consensus_scores_: frame_seq_len must divide L");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == B &&
                  out.size(1) == L / frame_seq_len,
              "consensus_scores_: out must be a contiguous float32 [B, F] tensor");
  TORCH_CHECK(!layers.empty() && layers.size() == layer_weights.size(),
              "consensus_scores_: layers and layer_weights must be non-empty and of equal length");
  for (const int64_t l : layers) TORCH_CHECK(l >= 0 && l < NL, "consensus_scores_: layer ", l, " out of range");
}

inline void check_weighted_drift_args(const at::Tensor& drift, const at::Tensor& small, const at::Tensor& image,
                                      const at::Tensor& prev_small, const at::Tensor& importance, int64_t pool,
                                      int64_t dilation) {
  TORCH_CHECK(image.dim() == 4 && pool >= 1 && image.size(2) % pool == 0 && image.size(3) % pool == 0,
              "drift_weighted_drift_: image must be [B, C, H, W] with H, W multiples of pool");
  TORCH_CHECK(small.is_contiguous() && drift.is_contiguous() && drift.scalar_type() == at::kFloat,
              "drift_weighted_drift_: outputs must be contiguous, drift float32");
  TORCH_CHECK(prev_small.sizes() == small.sizes() && prev_small.scalar_type() == small.scalar_type(),
              "drift_weighted_drift_: prev_small must match small");
  TORCH_CHECK(importance.dim() == 3 && importance.size(0) == image.size(0) && importance.scalar_type() == at::kFloat,
              "drift_weighted_drift_: importance must be float32 [B, gh, gw]");
  TORCH_CHECK(dilation >= 1 && dilation % 2 == 1, "drift_weighted_drift_: dilation must be odd and positive");
}

inline void check_patch_importance_args(const at::Tensor& out, const at::Tensor& attn, int64_t start, int64_t end,
                                        int64_t V, int64_t A) {
  TORCH_CHECK(attn.dim() == 5 && attn.size(3) == attn.size(4), "drift_patch_importance_: attn must be [NL, B, H, S, S]");
  TORCH_CHECK(0 <= start && start < end && end <= attn.size(0) && 1 <= V && V <= attn.size(4) && 1 <= A &&
                  A <= attn.size(3),
              "drift_patch_importance_: layer range, V or A out of bounds");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.numel() == attn.size(1) * V,
              "drift_patch_importance_: out must be contiguous float32 [B, gh, gw] with gh * gw = V");
}

}  // namespace streamkern
