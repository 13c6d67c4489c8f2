// The spectral token's per-bin MLP head in float32 as fused loops: GELU(GELU(f w1^T +
// b1) w2^T + b2) summed over each sample's bins, and its backward, one bin at a time
// with the activations of a sample kept in cache. Compiled for AVX-512, AVX2+FMA and
// baseline x86-64 (or the build's own target elsewhere), chosen once at run time.
// A training step's head then costs two calls instead of ~20 ATen dispatches (and
// their autograd nodes), each of which costs several microseconds once the backbone's
// convolutions have evicted it from the caches.
#pragma once
#include <cstdint>

namespace omnifm {
namespace cpu {

constexpr int64_t kRows = 8;    // bins per block: independent accumulator chains
constexpr int64_t kLanes = 16;  // output columns per register tile; widths are padded to it

inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
inline int64_t padded_rows(int64_t n) { return (n + kRows - 1) / kRows * kRows; }

// The head's weights, zero-padded to kLanes columns (hp, dp, mp = padded h, d, m).
struct HeadF32 {
  const float* w1t;  // (m, hp): w1 transposed
  const float* b1;   // (hp)
  const float* w2t;  // (h, dp): w2 transposed
  const float* b2;   // (dp)
  const float* w2p;  // (d, hp): w2
  const float* w1p;  // (h, mp): w1
  int64_t m, h, d, mp, hp, dp;
};

// pooled (samples, d) = sum over each sample's bins of the head's output, for the rows
// f (samples * bins, m). scratch: kRows * (2 * hp + dp) floats.
void head_forward_f32(const float* f, int64_t samples, int64_t bins, const HeadF32& w, float* pooled,
                      float* scratch);

// One sample, for its backward: a1 (padded_rows(bins), hp), GELU's derivative at the
// pre-activations g1 (padded_rows(bins), hp) and g2 (padded_rows(bins), dp), and
// pooled (d), the sum over its bins.
void head_forward_keep_f32(const float* f, int64_t bins, const HeadF32& w, float* g1, float* a1, float* g2,
                           float* pooled);

// One sample's backward from g_sum (d) = dL/d(pooled sum), with what the keep pass kept:
// adds to g_w1t (m, hp), g_b1 (hp), g_w2 (d, hp), g_b2 (dp); writes g_f (bins, m).
// scratch: backward_scratch(bins, w) floats.
inline int64_t backward_scratch(int64_t bins, const HeadF32& w) {
  return padded_rows(bins) * (w.dp + w.hp) + kRows * w.mp;
}

void head_backward_f32(const float* f, int64_t bins, const HeadF32& w, const float* g_sum, const float* g1,
                       const float* a1, const float* g2, float* g_w1t, float* g_b1, float* g_w2, float* g_b2,
                       float* g_f, float* scratch);

}  // namespace cpu
}  // namespace omnifm
