// CPU kernel: centred low-pass magnitude window, one sample per task.
#include <ATen/Parallel.h>
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
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      at::Tensor mag = window_magnitude(x.select(0, b), bases, size);
      out.select(0, b).copy_(log ? at::log1p(mag) : mag);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("lowpass_spectrum", &lowpass_spectrum_cpu);
}

}  // namespace cpu
}  // namespace omnifm
