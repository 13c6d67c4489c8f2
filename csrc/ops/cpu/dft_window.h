// Centred low-pass window of the 2-D DFT ("forward" normalisation) as small matrix
// products, shared by the CPU kernels of lowpass_spectrum and spectral_token.
#pragma once
#include <ATen/ATen.h>

namespace omnifm {
namespace cpu {

// Real-input symmetry |X(-u,-v)| = |X(u,v)| lets us compute only the half plane
// rows u in [-K/2, K/2], columns v in [0, K/2] and mirror the rest of the window.
struct HalfWindowBases {
  at::Tensor rows;  // (2*nr, H): [cos; -sin](2*pi*u*h/H) / H
  at::Tensor cols;  // (W, 2*nc): [cos | -sin](2*pi*v*w/W) / W
  int64_t nr;
  int64_t nc;
};

HalfWindowBases half_window_bases(int64_t H, int64_t W, int64_t K, at::ScalarType dtype);

// planes: (N, H, W) -> (N, K, K) magnitude of the centred window of each plane.
at::Tensor window_magnitude(const at::Tensor& planes, const HalfWindowBases& bases, int64_t K);

// Samples per parallel task: enough that per-call overheads amortise on small images,
// few enough that a task's data stays in cache and every thread gets work.
int64_t samples_per_task(int64_t B, int64_t bytes_per_sample);

}  // namespace cpu
}  // namespace omnifm
