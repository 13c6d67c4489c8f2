// CPU kernel: centred low-pass magnitude window, a chunk of samples at a time.
#include <torch/library.h>

#include "check.h"
#include "dft_window.h"

namespace omnifm {
namespace cpu {

at::Tensor lowpass_spectrum_cpu(const at::Tensor& x_in, int64_t size, bool log) {
  check_image(x_in, size);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = new_output({B, C, size, size}, x.options());
  if (B == 0 || C == 0) return out;
  const HalfWindowBases bases = half_window_bases(H, W, size, x.scalar_type());
  const int64_t chunk = samples_per_task(B, C * H * W * x.element_size());
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    at::Tensor mag = window_magnitude(x.narrow(0, b0, nb).reshape({nb * C, H, W}), bases, size);
    out.narrow(0, b0, nb).copy_((log ? at::log1p(mag) : mag).view({nb, C, size, size}));
  }
  return out;
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("lowpass_spectrum", &lowpass_spectrum_cpu);
}

}  // namespace cpu
}  // namespace omnifm
