// Packed 64-bit ranking keys shared by the CPU and CUDA kernels of bank_evict_select and pose_topk: the winner
// is the smallest key, so one integer min (or an ascending sort) applies the whole rule, ties included (the
// index sits in the low bits). Host and device code (torch-free).
#pragma once
#include "streamkern/common.h"
#include <cmath>
#include <cstdint>
#include <cstring>

namespace streamkern {

// Monotone float -> uint32 map: for non-NaN a, b, a < b iff ordered_bits(a) < ordered_bits(b); -0.0 == +0.0.
STREAMKERN_HD uint32_t ordered_bits(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of ordered_bits (for non-NaN values).
STREAMKERN_HD float from_ordered_bits(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// --- bank_evict_select: minimise (valid, !redundant, isnan(score), score, slot); an invalid slot keys by slot only.
constexpr int kEvictSlotBits = 7;  // slots < 128 (the op allows 64)

STREAMKERN_HD uint64_t evict_key(bool valid, bool redundant, float score, int slot) {
  if (!valid) return static_cast<uint64_t>(slot);
  const bool nan = score != score;
  return (uint64_t{1} << 41) | (static_cast<uint64_t>(!redundant) << 40) | (static_cast<uint64_t>(nan) << 39) |
         (static_cast<uint64_t>(nan ? 0u : ordered_bits(score)) << kEvictSlotBits) | static_cast<uint64_t>(slot);
}

STREAMKERN_HD int64_t evict_slot(uint64_t key) { return static_cast<int64_t>(key & ((1u << kEvictSlotBits) - 1)); }

// --- pose_topk: minimise (invalid, isnan(sim), -sim, index); padding is kPosePad.
constexpr int kPoseIndexBits = 16;  // entries < 65536 (the op allows 4096)
constexpr uint64_t kPosePad = ~uint64_t{0};

STREAMKERN_HD uint64_t pose_key(bool valid, float sim, int index) {
  if (!valid) return (uint64_t{1} << 62) | static_cast<uint64_t>(index);
  const bool nan = sim != sim;
  const uint32_t desc = nan ? 0u : static_cast<uint32_t>(~ordered_bits(sim));
  return (static_cast<uint64_t>(nan) << 61) | (static_cast<uint64_t>(desc) << kPoseIndexBits) |
         static_cast<uint64_t>(index);
}

STREAMKERN_HD bool pose_key_chosen(uint64_t key) { return (key >> 62) == 0; }
STREAMKERN_HD int64_t pose_key_index(uint64_t key) {
  return static_cast<int64_t>(key & ((uint64_t{1} << kPoseIndexBits) - 1));
}
STREAMKERN_HD float pose_key_sim(uint64_t key) {
  if ((key >> 61) & 1u) return NAN;
  return from_ordered_bits(~static_cast<uint32_t>(key >> kPoseIndexBits));
}

// sim = exp(-sqrt((dx² + dy²) + dz²) / scale) in double, rounded to float: every backend (and the float64 torch
// reference) gets the same float, so rankings agree exactly. No FMA contraction on the device either.
STREAMKERN_HD float pose_similarity(double dx, double dy, double dz, double scale) {
#if defined(__CUDA_ARCH__)
  const double d2 = __dadd_rn(__dadd_rn(__dmul_rn(dx, dx), __dmul_rn(dy, dy)), __dmul_rn(dz, dz));
  return static_cast<float>(exp(-__ddiv_rn(__dsqrt_rn(d2), scale)));
#else
  const double d2 = (dx * dx + dy * dy) + dz * dz;
  return static_cast<float>(std::exp(-std::sqrt(d2) / scale));
#endif
}

}  // namespace streamkern
