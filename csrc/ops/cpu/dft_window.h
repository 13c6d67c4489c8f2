// Centred low-pass window of the 2-D DFT ("forward" normalisation) as small matrix
// products, shared by the CPU kernels of lowpass_spectrum and spectral_token.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

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

// planes: (N, H, W) -> (N, 2*nr, 2*nc) products [cos; -sin] x [cos | -sin] of each
// plane's half window (two ATen calls for the whole batch).
at::Tensor window_parts(const at::Tensor& planes, const HalfWindowBases& bases);

// Magnitude of window bin (i, j) of plane n, read from window_parts' output z.
// Column j has v = j - K/2: v >= 0 is row u + K/2, column v of the half window;
// v < 0 mirrors (u, v) -> (-u, -v) (|X(-u,-v)| = |X(u,v)| for a real plane).
template <typename T>
struct WindowIndex {
  const T* z;
  int64_t nr, nc, K;

  T magnitude(int64_t n, int64_t i, int64_t j) const {
    const int64_t half = K / 2;
    const bool mirror = j < half;
    const int64_t row = mirror ? 2 * half - i : i, col = mirror ? half - j : j - half;
    const T* p = z + n * 4 * nr * nc;  // (2*nr, 2*nc): [cos rows; -sin rows] x [cos cols | -sin cols]
    const T ch_p = p[row * 2 * nc + col], ch_q = p[row * 2 * nc + nc + col];
    const T sh_p = p[(nr + row) * 2 * nc + col], sh_q = p[(nr + row) * 2 * nc + nc + col];
    const T re = ch_p - sh_q, im = ch_q + sh_p;
    return std::sqrt(re * re + im * im);
  }
};

// planes: (N, H, W) -> (N, K, K) magnitude of the centred window of each plane.
at::Tensor window_magnitude(const at::Tensor& planes, const HalfWindowBases& bases, int64_t K);

// Samples per chunk of a kernel's serial loop over the batch: as many as keep a chunk's
// images in cache (about 1 MiB), so a small batch is one chunk. The ATen calls inside a
// chunk, and its samples (parallel.h), run on torch's intra-op threads.
int64_t samples_per_task(int64_t B, int64_t bytes_per_sample);

}  // namespace cpu
}  // namespace omnifm
