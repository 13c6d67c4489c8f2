// CPU kernel: the whole spectral token per sample (window DFT, log1p, FreqMix, MLP,
// pooling, L2 normalisation). Each task takes a chunk of samples, keeps their
// intermediates in cache and writes only their (d,) rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"
#include "dft_window.h"

namespace omnifm {
namespace cpu {

at::Tensor spectral_token_cpu(const at::Tensor& x_in, const at::Tensor& mix_weight,
                              const at::Tensor& freq_embed, const at::Tensor& w1,
                              const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                              int64_t size) {
  check_image(x_in, size);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(mix_weight.dim() == 2, "mix_weight: expected (m, C)");
  const int64_t m = mix_weight.size(0);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w2.dim() == 2, "w1, w2: expected 2-D weights");
  const int64_t h = w1.size(0), d = w2.size(0);
  check_param(mix_weight, "mix_weight", {m, C}, x);
  check_param(freq_embed, "freq_embed", {size * size, m}, x);
  check_param(w1, "w1", {h, m}, x);
  check_param(b1, "b1", {h}, x);
  check_param(w2, "w2", {d, h}, x);
  check_param(b2, "b2", {d}, x);

  at::Tensor out = new_output({B, d}, x.options());
  if (B == 0) return out;
  const HalfWindowBases bases = half_window_bases(H, W, size, x.scalar_type());
  const at::Tensor mix_t = mix_weight.t().contiguous();
  const at::Tensor w1_t = w1.t().contiguous();
  const at::Tensor w2_t = w2.t().contiguous();
  const double eps = 1e-12;  // as torch.nn.functional.normalize
  const int64_t chunk = samples_per_task(B, C * H * W * x.element_size());
  const int64_t tasks = (B + chunk - 1) / chunk;
  const int64_t bins = size * size;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * chunk, nb = std::min(chunk, B - b0);
      // (nb, C, K, K) -> nb * K*K frequency bins with C channel values each.
      at::Tensor s = at::log1p(window_magnitude(x.narrow(0, b0, nb).reshape({nb * C, H, W}), bases, size))
                         .view({nb, C, bins})
                         .transpose(1, 2)
                         .reshape({nb * bins, C});
      at::Tensor f = at::mm(s, mix_t).view({nb, bins, m}).add_(freq_embed).view({nb * bins, m});
      at::Tensor a1 = at::gelu(at::addmm(b1, f, w1_t));
      at::Tensor a2 = at::gelu(at::addmm(b2, a1, w2_t));
      at::Tensor pooled = a2.view({nb, bins, d}).mean(1);
      out.narrow(0, b0, nb).copy_(pooled / pooled.norm(2, 1, true).clamp_min(eps));
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("spectral_token", &spectral_token_cpu);
}

}  // namespace cpu
}  // namespace omnifm
