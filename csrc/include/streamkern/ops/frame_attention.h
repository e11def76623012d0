// frame_attention_ (docs/contract.md §4.5): the op schema and the checks its C++ entry points repeat for direct calls of
// torch.ops.streamkern_C.frame_attention_ (the Python layer has already validated every argument). frame_attention
// has a CPU kernel only (csrc/cpu/frame_attention.cpp); the Triton kernel is its GPU path.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

namespace streamkern {

inline constexpr const char* kFrameAttentionSchema =
    "frame_attention_(Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_table, Tensor? new_k, Tensor? new_v, "
    "Tensor? gate, float sm_scale, Tensor(a!) out, Tensor(b!) lse) -> ()";

// q [B, Lq, H, D]; k_pages/v_pages [B, P, F, H, D]; page_table int64 [B, H, K]; new_k/new_v [B, Ln, H, D] or
// neither; gate bool [B] or None; out [B, Lq, H, D] in q's dtype; lse float32 [B, H, Lq]; all on one device, any
// strides; q, pages, new keys and out of one dtype among float32, float16, bfloat16.
inline void check_frame_attention_args(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                       const at::Tensor& page_table, const std::optional<at::Tensor>& new_k,
                                       const std::optional<at::Tensor>& new_v, const std::optional<at::Tensor>& gate,
                                       const at::Tensor& out, const at::Tensor& lse) {
  constexpr const char* op = "frame_attention_";
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, Lq, H, D], got ", q.sizes());
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(k_pages.dim() == 5 && k_pages.size(0) == B && k_pages.size(3) == H && k_pages.size(4) == D, op,
                    ": k_pages must be [B=", B, ", P, F, H=", H, ", D=", D, "], got ", k_pages.sizes());
  TORCH_CHECK_VALUE(v_pages.sizes() == k_pages.sizes(), op, ": v_pages must match k_pages ", k_pages.sizes(),
                    ", got ", v_pages.sizes());
  TORCH_CHECK_VALUE(page_table.dim() == 3 && page_table.size(0) == B && page_table.size(1) == H, op,
                    ": page_table must be [B=", B, ", H=", H, ", K], got ", page_table.sizes());
  TORCH_CHECK_TYPE(page_table.scalar_type() == at::kLong, op, ": page_table must be int64, got ",
                   page_table.scalar_type());
  TORCH_CHECK_VALUE(new_k.has_value() == new_v.has_value(), op, ": new_k and new_v come together or not at all");
  if (new_k.has_value()) {
    TORCH_CHECK_VALUE(new_k->dim() == 4 && new_k->size(0) == B && new_k->size(2) == H && new_k->size(3) == D, op,
                      ": new_k must be [B=", B, ", Ln, H=", H, ", D=", D, "], got ", new_k->sizes());
    TORCH_CHECK_VALUE(new_v->sizes() == new_k->sizes(), op, ": new_v must match new_k ", new_k->sizes(), ", got ",
                      new_v->sizes());
  }
  for (const at::Tensor* t : {&k_pages, &v_pages, &out})
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": k_pages, v_pages and out must have q's dtype ",
                     q.scalar_type(), ", got ", t->scalar_type());
  for (const std::optional<at::Tensor>* t : {&new_k, &new_v})
    TORCH_CHECK_TYPE(!t->has_value() || (*t)->scalar_type() == q.scalar_type(), op,
                     ": new_k and new_v must have q's dtype ", q.scalar_type());
  if (gate.has_value())
    TORCH_CHECK_TYPE(gate->scalar_type() == at::kBool && gate->dim() == 1 && gate->size(0) == B, op,
                     ": gate must be bool [B=", B, "], got ", gate->scalar_type(), " ", gate->sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), op, ": out must be ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Lq, op,
                    ": lse must be [B=", B, ", H=", H, ", Lq=", Lq, "], got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  for (const at::Tensor* t : {&k_pages, &v_pages, &page_table, &out, &lse})
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": every tensor must be on q's device ", q.device());
  for (const std::optional<at::Tensor>* t : {&new_k, &new_v, &gate})
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == q.device(), op, ": every tensor must be on q's device ",
                      q.device());
}

}  // namespace streamkern
