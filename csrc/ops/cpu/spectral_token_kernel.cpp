// CPU kernels of the spectral token (window DFT, log1p, FreqMix, MLP, pooling, L2
// normalisation). The forward takes chunks of samples sized to stay in cache and
// writes only their (d,) rows. The backward recomputes the forward for the whole
// batch as flat (B*K*K, .) matrix products, keeping the pre-activations, and returns
// every parameter's gradient (and, when asked, the gradient of the log-magnitude bins)
// from one call. ATen runs only the matrix products and the GELUs (and their
// derivatives); the small steps between are loops here, so a training step pays about
// a dozen dispatches where the PyTorch form pays ~40 autograd nodes and Python calls.
// It recomputes what the reference keeps, so the reference stays faster where the
// per-bin MLP dominates (many small images): see CPU_EXT_MIN_ELEMENTS.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "check.h"
#include "dft_window.h"

namespace omnifm {
namespace cpu {
namespace {

constexpr double kEps = 1e-12;  // as torch.nn.functional.normalize

struct Params {
  int64_t B, C, m, h, d, bins;
};

Params check_inputs(const at::Tensor& x, const at::Tensor& mix_weight, const at::Tensor& freq_embed,
                    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                    int64_t size) {
  check_image(x, size);
  TORCH_CHECK_VALUE(mix_weight.dim() == 2, "mix_weight: expected (m, C)");
  TORCH_CHECK_VALUE(w1.dim() == 2 && w2.dim() == 2, "w1, w2: expected 2-D weights");
  const Params p{x.size(0), x.size(1), mix_weight.size(0), w1.size(0), w2.size(0), size * size};
  check_param(mix_weight, "mix_weight", {p.m, p.C}, x);
  check_param(freq_embed, "freq_embed", {p.bins, p.m}, x);
  check_param(w1, "w1", {p.h, p.m}, x);
  check_param(b1, "b1", {p.h}, x);
  check_param(w2, "w2", {p.d, p.h}, x);
  check_param(b2, "b2", {p.d}, x);
  return p;
}

// Log-magnitude bins s (nb*K*K, C) of x (nb, C, H, W) and FreqMix f = s mix_weight^T +
// freq_embed (nb*K*K, m), in one pass over the window products (C and m are small).
template <typename T>
void bins_and_mix(const at::Tensor& x, const HalfWindowBases& bases, int64_t size, const at::Tensor& mix_weight,
                  const at::Tensor& freq_embed, T* s, T* f) {
  const int64_t nb = x.size(0), C = x.size(1), bins = size * size, m = mix_weight.size(0);
  const at::Tensor z = window_parts(x.reshape({nb * C, x.size(2), x.size(3)}), bases);
  const WindowIndex<T> w{z.data_ptr<T>(), bases.nr, bases.nc, size};
  const T *mix = mix_weight.data_ptr<T>(), *embed = freq_embed.data_ptr<T>();
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t q = 0; q < bins; ++q) {
      T* srow = s + (b * bins + q) * C;
      for (int64_t c = 0; c < C; ++c) srow[c] = std::log1p(w.magnitude(b * C + c, q / size, q % size));
      T* frow = f + (b * bins + q) * m;
      for (int64_t j = 0; j < m; ++j) {
        T acc = 0;
        for (int64_t c = 0; c < C; ++c) acc += srow[c] * mix[j * C + c];
        frow[j] = acc + embed[q * m + j];
      }
    }
  }
}

// pooled (nb, d) = mean over the bins of a2 (nb*bins, d), summed in bin order.
template <typename T>
void mean_over_bins(const T* a2, int64_t nb, int64_t bins, int64_t d, T* pooled) {
  for (int64_t b = 0; b < nb; ++b) {
    T* p = pooled + b * d;
    std::fill(p, p + d, T(0));
    for (int64_t q = 0; q < bins; ++q) {
      const T* row = a2 + (b * bins + q) * d;
      for (int64_t e = 0; e < d; ++e) p[e] += row[e];
    }
    for (int64_t e = 0; e < d; ++e) p[e] /= static_cast<T>(bins);
  }
}

template <typename T>
T norm_of(const T* v, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += v[i] * v[i];
  return std::sqrt(acc);
}

}  // namespace

at::Tensor spectral_token_cpu(const at::Tensor& x_in, const at::Tensor& mix_weight_in,
                              const at::Tensor& freq_embed_in, const at::Tensor& w1,
                              const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                              int64_t size) {
  const Params p = check_inputs(x_in, mix_weight_in, freq_embed_in, w1, b1, w2, b2, size);
  const at::Tensor x = x_in.contiguous(), mix_weight = mix_weight_in.contiguous();
  const at::Tensor freq_embed = freq_embed_in.contiguous();
  at::Tensor out = new_output({p.B, p.d}, x.options());
  if (p.B == 0) return out;
  const HalfWindowBases bases = half_window_bases(x.size(2), x.size(3), size, x.scalar_type());
  const at::Tensor w1_t = w1.t(), w2_t = w2.t();
  // Serial over chunks (each ATen call inside runs on torch's intra-op threads): a
  // chunk's images and activations stay in cache, and a small batch is one chunk.
  const int64_t activations = p.bins * (p.C + p.m + p.h + p.d);  // per sample: s, f, a1, a2
  const int64_t chunk = samples_per_task(p.B, std::max(x.stride(0), activations) * x.element_size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spectral_token_cpu", [&] {
    at::Tensor s = at::empty({chunk * p.bins, p.C}, x.options());
    at::Tensor f = at::empty({chunk * p.bins, p.m}, x.options());
    at::Tensor pooled = at::empty({chunk, p.d}, x.options());
    for (int64_t b0 = 0; b0 < p.B; b0 += chunk) {
      const int64_t nb = std::min(chunk, p.B - b0);
      bins_and_mix<scalar_t>(x.narrow(0, b0, nb), bases, size, mix_weight, freq_embed, s.data_ptr<scalar_t>(),
                             f.data_ptr<scalar_t>());
      const at::Tensor a2 =
          at::gelu(at::addmm(b2, at::gelu(at::addmm(b1, f.narrow(0, 0, nb * p.bins), w1_t)), w2_t)).contiguous();
      scalar_t* pool = pooled.data_ptr<scalar_t>();
      mean_over_bins(a2.data_ptr<scalar_t>(), nb, p.bins, p.d, pool);
      scalar_t* o = out.data_ptr<scalar_t>() + b0 * p.d;
      for (int64_t b = 0; b < nb; ++b) {
        const scalar_t n = std::max(norm_of(pool + b * p.d, p.d), static_cast<scalar_t>(kEps));
        for (int64_t e = 0; e < p.d; ++e) o[b * p.d + e] = pool[b * p.d + e] / n;
      }
    }
  });
  return out;
}

// Gradients of sum(grad * spectral_token(x, ...)) with respect to mix_weight,
// freq_embed, w1, b1, w2, b2 and, when grad_bins, the log-magnitude bins s
// (B, C, K, K) (the caller maps that through the DFT's adjoint to x); else an empty
// tensor in that slot. Recomputes the forward for the whole batch, keeping the
// pre-activations; the small reductions are loops, the products and GELUs ATen's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
spectral_token_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mix_weight_in,
                            const at::Tensor& freq_embed_in, const at::Tensor& w1_in, const at::Tensor& b1,
                            const at::Tensor& w2_in, const at::Tensor& b2, int64_t size, bool grad_bins) {
  const Params p = check_inputs(x_in, mix_weight_in, freq_embed_in, w1_in, b1, w2_in, b2, size);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({p.B, p.d}), "grad: expected shape (B, d) = (", p.B, ", ",
                    p.d, "), got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous(), mix_weight = mix_weight_in.contiguous();
  const at::Tensor freq_embed = freq_embed_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t rows = p.B * p.bins;
  const HalfWindowBases bases = half_window_bases(x.size(2), x.size(3), size, x.scalar_type());
  at::Tensor s = at::empty({rows, p.C}, x.options()), f = at::empty({rows, p.m}, x.options());
  at::Tensor g_mix = at::zeros({p.m, p.C}, x.options()), g_embed = at::zeros({p.bins, p.m}, x.options());
  at::Tensor g_b1, g_b2, g_w1, g_w2, g_s = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spectral_token_backward_cpu", [&] {
    using T = scalar_t;
    if (p.B > 0) bins_and_mix<T>(x, bases, size, mix_weight, freq_embed, s.data_ptr<T>(), f.data_ptr<T>());
    const at::Tensor h1 = at::addmm(b1, f, w1.t());
    const at::Tensor a1 = at::gelu(h1);
    const at::Tensor h2 = at::addmm(b2, a1, w2.t());
    const at::Tensor a2 = at::gelu(h2).contiguous();
    // d normalize: (I - t t^T) g / |p| where |p| > eps, g / eps where the clamp is
    // active; the mean then spreads g_pooled / K*K to every bin (materialised: ATen's
    // gelu_backward is ~2x slower on a broadcast operand).
    at::Tensor g_pooled = at::empty({p.B, p.d}, x.options());
    std::vector<T> pooled(p.B * p.d);
    mean_over_bins(a2.data_ptr<T>(), p.B, p.bins, p.d, pooled.data());
    for (int64_t b = 0; b < p.B; ++b) {
      const T* pb = pooled.data() + b * p.d;
      const T* gb = grad.data_ptr<T>() + b * p.d;
      T* gp = g_pooled.data_ptr<T>() + b * p.d;
      const T n = norm_of(pb, p.d);
      if (n > static_cast<T>(kEps)) {
        T tg = 0;
        for (int64_t e = 0; e < p.d; ++e) tg += (pb[e] / n) * gb[e];
        for (int64_t e = 0; e < p.d; ++e) gp[e] = (gb[e] - (pb[e] / n) * tg) / n / static_cast<T>(p.bins);
      } else {
        for (int64_t e = 0; e < p.d; ++e) gp[e] = gb[e] / static_cast<T>(kEps) / static_cast<T>(p.bins);
      }
    }
    const at::Tensor g_a2 = g_pooled.unsqueeze(1).expand({p.B, p.bins, p.d}).reshape({rows, p.d});
    const at::Tensor g_h2 = at::gelu_backward(g_a2, h2);
    const at::Tensor g_h1 = at::gelu_backward(at::mm(g_h2, w2), h1);
    const at::Tensor g_f = at::mm(g_h1, w1).contiguous();  // (rows, m)
    g_w2 = at::mm(g_h2.t(), a1);
    g_b2 = g_h2.sum(0);
    g_w1 = at::mm(g_h1.t(), f);
    g_b1 = g_h1.sum(0);
    // The FreqMix gradients: C and m are small, one pass over g_f.
    const T *gf = g_f.data_ptr<T>(), *sp = s.data_ptr<T>(), *mix = mix_weight.data_ptr<T>();
    T *gm = g_mix.data_ptr<T>(), *ge = g_embed.data_ptr<T>();
    if (grad_bins) g_s = at::empty({p.B, p.C, size, size}, x.options());
    T* gs = grad_bins ? g_s.data_ptr<T>() : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const T* gfr = gf + r * p.m;
      const T* sr = sp + r * p.C;
      T* ger = ge + (r % p.bins) * p.m;
      for (int64_t j = 0; j < p.m; ++j) {
        ger[j] += gfr[j];
        for (int64_t c = 0; c < p.C; ++c) gm[j * p.C + c] += gfr[j] * sr[c];
      }
      if (gs != nullptr) {
        const int64_t b = r / p.bins, q = r % p.bins;
        for (int64_t c = 0; c < p.C; ++c) {
          T acc = 0;
          for (int64_t j = 0; j < p.m; ++j) acc += gfr[j] * mix[j * p.C + c];
          gs[(b * p.C + c) * p.bins + q] = acc;
        }
      }
    }
  });
  return {g_mix, g_embed, g_w1, g_b1, g_w2, g_b2, g_s};
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("spectral_token", &spectral_token_cpu);
  m.impl("spectral_token_backward", &spectral_token_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifm
