#include "token_head.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace omnifm {
namespace cpu {

// Each variant is token_head_simd.inc compiled in its own namespace; on x86-64 the
// vector ones under `#pragma GCC target`. Nothing outside these namespaces is compiled
// with those instruction sets, so no shared inline function can leak them.
#define OMNIFM_HEAD_FMA 0
namespace baseline {
#include "token_head_simd.inc"
}  // namespace baseline
#undef OMNIFM_HEAD_FMA
#define OMNIFM_HEAD_FMA 1

#if defined(__x86_64__) && defined(__GNUC__)
#define OMNIFM_HEAD_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "token_head_simd.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace avx512 {
#include "token_head_simd.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best variant this CPU runs, found once (cpuid).
Isa hardware() {
  static const Isa best = [] {
#ifdef OMNIFM_HEAD_X86
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return best;
}

// hardware(), capped by OMNIFM_CPU_HEAD_ISA=baseline|avx2 (tests), read per call so a
// test can switch variants in-process.
Isa isa() {
  const char* cap = std::getenv("OMNIFM_CPU_HEAD_ISA");
  const std::string want = cap == nullptr ? "" : cap;
  const Isa best = hardware();
  if (want == "baseline") return Isa::kBaseline;
  if (want == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
}

}  // namespace

#ifdef OMNIFM_HEAD_X86
#define OMNIFM_HEAD_DISPATCH(call)            \
  switch (isa()) {                            \
    case Isa::kAvx512: return avx512::call;   \
    case Isa::kAvx2: return avx2::call;       \
    default: return baseline::call;           \
  }
#else
#define OMNIFM_HEAD_DISPATCH(call) return baseline::call;
#endif

void head_forward_f32(const float* f, int64_t samples, int64_t bins, const HeadF32& w, float* pooled,
                      float* scratch) {
  OMNIFM_HEAD_DISPATCH(head_forward(f, samples, bins, w, pooled, scratch))
}

void head_forward_keep_f32(const float* f, int64_t bins, const HeadF32& w, float* g1, float* a1, float* g2,
                           float* pooled) {
  OMNIFM_HEAD_DISPATCH(sample_forward_keep(f, bins, w, g1, a1, g2, pooled))
}

void head_backward_f32(const float* f, int64_t bins, const HeadF32& w, const float* g_sum, const float* g1,
                       const float* a1, const float* g2, float* g_w1t, float* g_b1, float* g_w2, float* g_b2,
                       float* g_f, float* scratch) {
  OMNIFM_HEAD_DISPATCH(sample_backward(f, bins, w, g_sum, g1, a1, g2, g_w1t, g_b1, g_w2, g_b2, g_f, scratch))
}

}  // namespace cpu
}  // namespace omnifm
