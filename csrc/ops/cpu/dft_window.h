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

// x_s: (C, H, W) one sample -> (C, K, K) magnitude of the centred window.
at::Tensor window_magnitude(const at::Tensor& x_s, const HalfWindowBases& bases, int64_t K);

}  // namespace cpu
}  // namespace omnifm
