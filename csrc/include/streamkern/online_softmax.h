// The online-softmax update of one row of scores on the CPU, shared by the flash-attention kernels
// (csrc/cpu/frame_attention.cpp, csrc/cpu/block_masked_attention.cpp).
//
// A row of n raw scores s (-inf for a masked key) folds into the row's running max m (in units of scale·s) and sum
// l: m' = max(m, max_j scale·s_j), p_j = exp(scale·s_j − m'), l' = l·exp(m − m') + Σ_j p_j, and the row of the
// accumulator acc = Σ p·v is multiplied by exp(m − m'); p is left in s for the caller's acc += P·V.
// A row that has kept no key yet (m' = -inf) computes against base 0 instead of m' (no inf − inf NaN): its p, alpha
// and l stay 0. The loops are written so that GCC vectorises each of the AVX-512 / AVX2 / baseline clones
// (STREAMKERN_SIMD_CLONES, x86-64 GCC only): float compares may be if-converted (no FP exceptions are used:
// no-trapping-math), no out-of-line function is called (it would not inline into a clone), the row sum runs over
// kSoftmaxLanes independent lanes (a float sum GCC may not reorder) and the row max under finite math (row_max).
#pragma once
#include <cstdint>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define STREAMKERN_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STREAMKERN_SIMD_CLONES
#endif

namespace streamkern {
namespace {  // internal linkage: each translation unit gets its own clones and their resolver

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

constexpr int64_t kSoftmaxLanes = 16;

// exp(x) for x <= 0 (the softmax's s − max): 2^n · p(r) with n = x·log2 e rounded toward zero after a −1/2 shift
// (|r| <= ln 2 / 2 for x <= 0), r = x − n·ln 2 (two-part ln 2), p Cephes' expf polynomial (about 1 ulp). Below −87
// (exp < 1.7e-38, a denormal or 0 in float) and at −inf (a masked key) it is 0; NaN stays NaN.
inline float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const int32_t ni = static_cast<int32_t>(xc * 1.44269504088896341f - 0.5f);
  const float n = static_cast<float>(ni);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // The flush as a product, not a select of the result: GCC does not if-convert that select, and a NaN stays NaN.
  return p * __builtin_bit_cast(float, static_cast<uint32_t>(ni + 127) << 23) * (x < -87.0f ? 0.f : 1.f);
}

// max_j s[j] over a row of n scores. Finite math here only, so that GCC vectorises the max reduction (vmaxps; it
// does not reorder a reduction whose NaN and signed-zero cases it must keep): a masked key's -inf is compared as
// any other value there, and a NaN score may or may not reach the max (exp_row turns it into NaN either way).
#pragma GCC push_options
#pragma GCC optimize("finite-math-only", "no-signed-zeros")
STREAMKERN_SIMD_CLONES float row_max(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}
#pragma GCC pop_options

// s[j] <- exp(scale·s[j] − base) in place; returns the row sum.
STREAMKERN_SIMD_CLONES float exp_row(float* s, int64_t n, float scale, float base) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] * scale - base);
  float lane[kSoftmaxLanes] = {};
  int64_t j = 0;
  for (; j + kSoftmaxLanes <= n; j += kSoftmaxLanes)
    for (int64_t i = 0; i < kSoftmaxLanes; ++i) lane[i] += s[j + i];
  for (; j < n; ++j) lane[0] += s[j];
  float sum = 0.f;
  for (int64_t i = 0; i < kSoftmaxLanes; ++i) sum += lane[i];
  return sum;
}

STREAMKERN_SIMD_CLONES void scale_row(float* a, int64_t n, float alpha) {
  for (int64_t j = 0; j < n; ++j) a[j] *= alpha;
}

#pragma GCC pop_options

// The update of one row (see the top of this file): s [n] raw scores in, p out; m and l updated; the row's
// accumulator acc [d] multiplied by alpha = exp(m − m').
inline void online_softmax_row(float* s, int64_t n, float scale, float& m, float& l, float* acc, int64_t d) {
  const float tile_max = row_max(s, n) * scale;  // = max_j scale·s_j: scale > 0 and rounding is monotone
  const float m_new = tile_max > m ? tile_max : m;
  const float base = m_new == -std::numeric_limits<float>::infinity() ? 0.f : m_new;
  const float alpha = exp_nonpositive(m - base);  // 0 while m = -inf, exactly 1 when the max did not move
  l = l * alpha + exp_row(s, n, scale, base);
  m = m_new;
  scale_row(acc, d, alpha);
}

}  // namespace
}  // namespace streamkern
