// CPU kernels of the spectral token (window DFT, log1p, FreqMix, MLP head, pooling, L2
// normalisation). The forward takes chunks of samples sized to stay in cache and
// writes only their (d,) rows; a training forward (spectral_token_saving) also keeps
// the bins and the head's activations. The backward reads those, or recomputes them a
// sample at a time, and returns every parameter's gradient (and, when asked, the
// gradient of the log-magnitude bins) from one call.
// float32: the per-bin head (two linear maps and GELUs) runs as fused, vectorised loops
// (token_head.h), samples spread over torch's threads, so a training step makes two
// calls where the PyTorch form pays ~40 autograd nodes and ATen dispatches, each slowed
// by the backbone's convolutions having just evicted it from the caches. float64: ATen
// runs the head's products and GELUs. The CPU dispatcher's size rule:
// CPU_EXT_MIN_ELEMENTS and CPU_EXT_MAX_HEAD_WORK in omnifm/ops/spectral_token.py.
#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "check.h"
#include "dft_window.h"
#include "parallel.h"
#include "token_head.h"

namespace omnifm {
namespace cpu {
namespace {

constexpr double kEps = 1e-12;  // as torch.nn.functional.normalize
constexpr int64_t kGradGroups = 8;  // the float32 backward's sample groups (head_backward)

struct Params {
  int64_t B, C, m, h, d, bins;
};

// The head's multiply-adds for nb samples (its backward: about twice that).
int64_t head_work(int64_t nb, const Params& p) { return nb * p.bins * p.h * (p.m + p.d); }

constexpr int64_t kLog1pCost = 20;  // a magnitude and log1p, counted as multiply-adds

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
  parallel_ranges(nb, nb * bins * C * (m + kLog1pCost), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
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
  });
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

// token (d) = pooled / max(|pooled|, eps), as F.normalize.
template <typename T>
void write_token(const T* pooled, int64_t d, T* token) {
  const T n = std::max(norm_of(pooled, d), static_cast<T>(kEps));
  for (int64_t e = 0; e < d; ++e) token[e] = pooled[e] / n;
}

// g_pooled (d): dL/dpooled of normalize(pooled) for the token's gradient g, divided by
// the bins (the mean's share of each bin): (I - t t^T) g / |p| where |p| > eps, g / eps
// where the clamp is active.
template <typename T>
void pooled_grad(const T* pooled, const T* g, int64_t d, int64_t bins, T* gp) {
  const T n = norm_of(pooled, d);
  if (n > static_cast<T>(kEps)) {
    T tg = 0;
    for (int64_t e = 0; e < d; ++e) tg += (pooled[e] / n) * g[e];
    for (int64_t e = 0; e < d; ++e) gp[e] = (g[e] - (pooled[e] / n) * tg) / n / static_cast<T>(bins);
  } else {
    for (int64_t e = 0; e < d; ++e) gp[e] = g[e] / static_cast<T>(kEps) / static_cast<T>(bins);
  }
}

// The float32 head's weights in the padded layouts its loops read (token_head.h).
struct HeadWeightsF32 {
  std::vector<float> w1t, b1, w2t, b2, w2p, w1p;
  HeadF32 view;

  HeadWeightsF32(const at::Tensor& w1_in, const at::Tensor& b1_in, const at::Tensor& w2_in, const at::Tensor& b2_in) {
    const at::Tensor w1c = w1_in.contiguous(), b1c = b1_in.contiguous(), w2c = w2_in.contiguous();
    const at::Tensor b2c = b2_in.contiguous();
    const int64_t h = w1c.size(0), m = w1c.size(1), d = w2c.size(0);
    const int64_t hp = padded(h), dp = padded(d), mp = padded(m);
    const float *p1 = w1c.data_ptr<float>(), *p2 = w2c.data_ptr<float>();
    w1t.assign(m * hp, 0.0f), b1.assign(hp, 0.0f), w2t.assign(h * dp, 0.0f), b2.assign(dp, 0.0f);
    w2p.assign(d * hp, 0.0f), w1p.assign(h * mp, 0.0f);
    for (int64_t j = 0; j < h; ++j) {
      b1[j] = b1c.data_ptr<float>()[j];
      for (int64_t i = 0; i < m; ++i) w1t[i * hp + j] = w1p[j * mp + i] = p1[j * m + i];
    }
    for (int64_t e = 0; e < d; ++e) {
      b2[e] = b2c.data_ptr<float>()[e];
      for (int64_t j = 0; j < h; ++j) w2t[j * dp + e] = w2p[e * hp + j] = p2[e * h + j];
    }
    view = HeadF32{w1t.data(), b1.data(), w2t.data(), b2.data(), w2p.data(), w1p.data(), m, h, d, mp, hp, dp};
  }
};

// What a training forward keeps for its backward (float32), in one flat tensor, so
// the backward runs neither the window DFT nor the head's forward again:
//   s (B*bins, C) | f (B*bins, m) | per sample: g1 (rows, hp) | a1 (rows, hp) | g2 (rows, dp)
//   | pooled (B, d)
// rows = padded_rows(bins); hp, dp: h, d padded (token_head.h); g1, g2: GELU's
// derivative at the pre-activations; pooled: the mean over the bins, before the L2
// normalisation. kept_numel in omnifm/ops/spectral_token.py repeats this size.
struct KeptLayout {
  int64_t s, f, head, pooled, per_sample, numel;  // offsets, a sample's head block, total

  explicit KeptLayout(const Params& p) {
    const int64_t rows = padded_rows(p.bins);
    per_sample = rows * (2 * padded(p.h) + padded(p.d));
    s = 0, f = p.B * p.bins * p.C, head = f + p.B * p.bins * p.m;
    pooled = head + p.B * per_sample, numel = pooled + p.B * p.d;
  }
};

// pooled (nb, d): the mean over each sample's bins of the head on the rows f
// (nb * bins, m); the fused loops in float32, ATen's products and GELUs in float64.
template <typename T>
void pooled_head(const at::Tensor& f, int64_t nb, const Params& p, const HeadWeightsF32* head, const at::Tensor& b1,
                 const at::Tensor& w1_t, const at::Tensor& b2, const at::Tensor& w2_t, T* pooled) {
  if constexpr (std::is_same_v<T, float>) {
    const float* rows = f.data_ptr<float>();
    parallel_ranges(nb, head_work(nb, p), [&](int64_t b0, int64_t b1) {  // samples are independent
      std::vector<float> scratch(kRows * (2 * head->view.hp + head->view.dp));
      head_forward_f32(rows + b0 * p.bins * p.m, b1 - b0, p.bins, head->view, pooled + b0 * p.d, scratch.data());
    });
    for (int64_t i = 0; i < nb * p.d; ++i) pooled[i] /= static_cast<float>(p.bins);
  } else {
    const at::Tensor a2 = at::gelu(at::addmm(b2, at::gelu(at::addmm(b1, f, w1_t)), w2_t)).contiguous();
    mean_over_bins(a2.data_ptr<T>(), nb, p.bins, p.d, pooled);
  }
}

// The head's backward for the whole batch: g_f (rows, m) and the gradients of w1, b1,
// w2, b2, from the rows f and the token's gradient grad (B, d).
struct HeadGrads {
  at::Tensor g_f, g_w1, g_b1, g_w2, g_b2;
};

// kept: the forward's head blocks and pooled means (KeptLayout), or null to recompute them.
HeadGrads head_backward(const at::Tensor& f, const Params& p, const at::Tensor& grad, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const float* kept) {
  // The fused head, a sample at a time: its bins' activations stay in cache. Samples go
  // in a fixed number of groups (at most kGradGroups, by B alone) spread over torch's
  // threads; each group sums its samples' parameter gradients in sample order, and the
  // groups are summed in group order, so the result does not depend on the threads.
  const auto opts = f.options();
  HeadGrads out{at::empty({p.B * p.bins, p.m}, opts), at::empty({p.h, p.m}, opts), at::empty({p.h}, opts),
                at::empty({p.d, p.h}, opts), at::empty({p.d}, opts)};
  const HeadWeightsF32 head(w1, b1, w2, b2);
  const int64_t hp = head.view.hp, dp = head.view.dp, mp = head.view.mp, rows = padded_rows(p.bins);
  const int64_t per_sample = p.m * hp + hp + p.d * hp + dp;  // g_w1t (m, hp) | g_b1 (hp) | g_w2 (d, hp) | g_b2 (dp)
  const KeptLayout layout(p);
  const int64_t groups = std::min<int64_t>(p.B, kGradGroups);
  const int64_t group_size = groups > 0 ? (p.B + groups - 1) / groups : 0;
  std::vector<float> partial(groups * per_sample, 0.0f);
  parallel_ranges(groups, 2 * head_work(p.B, p), [&](int64_t g0, int64_t g1_end) {
    std::vector<float> g1(rows * hp), a1(rows * hp), g2(rows * dp), pooled(p.d), gp(p.d);  // token_head.h
    std::vector<float> scratch(backward_scratch(p.bins, head.view)), sample(per_sample);
    float *s_w1t = sample.data(), *s_b1 = s_w1t + p.m * hp, *s_w2 = s_b1 + hp, *s_b2 = s_w2 + p.d * hp;
    for (int64_t g = g0; g < g1_end; ++g) {
      float* sum = partial.data() + g * per_sample;
      for (int64_t b = g * group_size; b < std::min(p.B, (g + 1) * group_size); ++b) {
        const float* fb = f.data_ptr<float>() + b * p.bins * p.m;
        const float *kg1 = g1.data(), *ka1 = a1.data(), *kg2 = g2.data(), *kpooled = pooled.data();
        if (kept != nullptr) {
          kg1 = kept + layout.head + b * layout.per_sample, ka1 = kg1 + rows * hp, kg2 = ka1 + rows * hp;
          kpooled = kept + layout.pooled + b * p.d;
        } else {
          head_forward_keep_f32(fb, p.bins, head.view, g1.data(), a1.data(), g2.data(), pooled.data());
          for (float& v : pooled) v /= static_cast<float>(p.bins);
        }
        pooled_grad(kpooled, grad.data_ptr<float>() + b * p.d, p.d, p.bins, gp.data());
        std::fill(sample.begin(), sample.end(), 0.0f);
        head_backward_f32(fb, p.bins, head.view, gp.data(), kg1, ka1, kg2, s_w1t, s_b1, s_w2, s_b2,
                          out.g_f.data_ptr<float>() + b * p.bins * p.m, scratch.data());
        for (int64_t i = 0; i < per_sample; ++i) sum[i] += sample[i];
      }
    }
  });
  std::vector<float> total(per_sample, 0.0f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < per_sample; ++i) total[i] += partial[g * per_sample + i];
  const float *t_w1t = total.data(), *t_b1 = t_w1t + p.m * hp, *t_w2 = t_b1 + hp, *t_b2 = t_w2 + p.d * hp;
  float *gw1 = out.g_w1.data_ptr<float>(), *gw2 = out.g_w2.data_ptr<float>();
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t j = 0; j < p.h; ++j) gw1[j * p.m + i] = t_w1t[i * hp + j];
  for (int64_t e = 0; e < p.d; ++e) std::copy(t_w2 + e * hp, t_w2 + e * hp + p.h, gw2 + e * p.h);
  std::copy(t_b1, t_b1 + p.h, out.g_b1.data_ptr<float>());
  std::copy(t_b2, t_b2 + p.d, out.g_b2.data_ptr<float>());
  return out;
}

HeadGrads head_backward(const at::Tensor& f, const Params& p, const at::Tensor& grad, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const double*) {
  const int64_t rows = p.B * p.bins;
  const at::Tensor h1 = at::addmm(b1, f, w1.t());
  const at::Tensor a1 = at::gelu(h1);
  const at::Tensor h2 = at::addmm(b2, a1, w2.t());
  const at::Tensor a2 = at::gelu(h2).contiguous();
  // The mean spreads g_pooled to every bin (materialised: ATen's gelu_backward is ~2x
  // slower on a broadcast operand).
  at::Tensor g_pooled = at::empty({p.B, p.d}, f.options());
  std::vector<double> pooled(p.B * p.d);
  mean_over_bins(a2.data_ptr<double>(), p.B, p.bins, p.d, pooled.data());
  for (int64_t b = 0; b < p.B; ++b)
    pooled_grad(pooled.data() + b * p.d, grad.data_ptr<double>() + b * p.d, p.d, p.bins,
                g_pooled.data_ptr<double>() + b * p.d);
  const at::Tensor g_a2 = g_pooled.unsqueeze(1).expand({p.B, p.bins, p.d}).reshape({rows, p.d});
  const at::Tensor g_h2 = at::gelu_backward(g_a2, h2);
  const at::Tensor g_h1 = at::gelu_backward(at::mm(g_h2, w2), h1);
  return {at::mm(g_h1, w1).contiguous(), at::mm(g_h1.t(), f), g_h1.sum(0), at::mm(g_h2.t(), a1), g_h2.sum(0)};
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
  std::unique_ptr<HeadWeightsF32> head;  // float32: the fused head (token_head.h)
  if (x.scalar_type() == at::kFloat) head = std::make_unique<HeadWeightsF32>(w1, b1, w2, b2);
  // Serial over chunks (a chunk's samples, and each ATen call, run on torch's intra-op
  // threads): a chunk's images and activations stay in cache, and a small batch is one chunk.
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
      scalar_t* pool = pooled.data_ptr<scalar_t>();
      pooled_head<scalar_t>(f.narrow(0, 0, nb * p.bins), nb, p, head.get(), b1, w1_t, b2, w2_t, pool);
      scalar_t* o = out.data_ptr<scalar_t>() + b0 * p.d;
      for (int64_t b = 0; b < nb; ++b) write_token(pool + b * p.d, p.d, o + b * p.d);
    }
  });
  return out;
}

// spectral_token for a training step: the tokens (B, d) and, in float32, what the
// backward needs (KeptLayout), so it runs neither the window DFT nor the head's forward
// again; in float64 an empty tensor (its backward recomputes through ATen).
std::tuple<at::Tensor, at::Tensor> spectral_token_saving_cpu(const at::Tensor& x_in, const at::Tensor& mix_weight_in,
                                                             const at::Tensor& freq_embed_in, const at::Tensor& w1,
                                                             const at::Tensor& b1, const at::Tensor& w2,
                                                             const at::Tensor& b2, int64_t size) {
  const Params p = check_inputs(x_in, mix_weight_in, freq_embed_in, w1, b1, w2, b2, size);
  if (x_in.scalar_type() != at::kFloat)
    return {spectral_token_cpu(x_in, mix_weight_in, freq_embed_in, w1, b1, w2, b2, size), at::empty({0}, x_in.options())};
  const at::Tensor x = x_in.contiguous(), mix_weight = mix_weight_in.contiguous();
  const at::Tensor freq_embed = freq_embed_in.contiguous();
  const KeptLayout layout(p);
  at::Tensor kept = new_output({layout.numel}, x.options());  // every entry is written (tests poison it)
  at::Tensor out = new_output({p.B, p.d}, x.options());
  if (p.B == 0) return {out, kept};
  const HalfWindowBases bases = half_window_bases(x.size(2), x.size(3), size, x.scalar_type());
  float* k = kept.data_ptr<float>();
  bins_and_mix<float>(x, bases, size, mix_weight, freq_embed, k + layout.s, k + layout.f);
  const HeadWeightsF32 head(w1, b1, w2, b2);
  const int64_t rows = padded_rows(p.bins), hp = head.view.hp;
  float* o = out.data_ptr<float>();
  parallel_ranges(p.B, head_work(p.B, p), [&](int64_t b0, int64_t b1_end) {  // samples are independent
    for (int64_t b = b0; b < b1_end; ++b) {
      float *g1 = k + layout.head + b * layout.per_sample, *pooled = k + layout.pooled + b * p.d;
      head_forward_keep_f32(k + layout.f + b * p.bins * p.m, p.bins, head.view, g1, g1 + rows * hp,
                            g1 + 2 * rows * hp, pooled);
      for (int64_t e = 0; e < p.d; ++e) pooled[e] /= static_cast<float>(p.bins);
      write_token(pooled, p.d, o + b * p.d);
    }
  });
  return {out, kept};
}

// Gradients of sum(grad * spectral_token(x, ...)) with respect to mix_weight,
// freq_embed, w1, b1, w2, b2 and, when grad_bins, the log-magnitude bins s
// (B, C, K, K) (the caller maps that through the DFT's adjoint to x); else an empty
// tensor in that slot. With `kept` from spectral_token_saving (float32) it reads the
// forward's bins and activations; without, it recomputes the forward, keeping the
// pre-activations (float32: a sample at a time in the fused head; float64: the whole
// batch through ATen).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
spectral_token_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mix_weight_in,
                            const at::Tensor& freq_embed_in, const at::Tensor& w1_in, const at::Tensor& b1,
                            const at::Tensor& w2_in, const at::Tensor& b2, int64_t size, bool grad_bins,
                            const c10::optional<at::Tensor>& kept_in) {
  const Params p = check_inputs(x_in, mix_weight_in, freq_embed_in, w1_in, b1, w2_in, b2, size);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({p.B, p.d}), "grad: expected shape (B, d) = (", p.B, ", ",
                    p.d, "), got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous(), mix_weight = mix_weight_in.contiguous();
  const at::Tensor freq_embed = freq_embed_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t rows = p.B * p.bins;
  const bool use_kept = kept_in.has_value() && kept_in->numel() > 0;
  at::Tensor kept, s, f;  // s, f: the bins and FreqMix rows, kept or recomputed below
  if (use_kept) {
    const KeptLayout layout(p);
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && kept_in->scalar_type() == at::kFloat &&
                          kept_in->dim() == 1 && kept_in->numel() == layout.numel,
                      "kept: expected the float32 tensor spectral_token_saving returned for these inputs");
    kept = kept_in->contiguous();
    s = kept.narrow(0, layout.s, rows * p.C).view({rows, p.C});
    f = kept.narrow(0, layout.f, rows * p.m).view({rows, p.m});
  } else {
    s = at::empty({rows, p.C}, x.options()), f = at::empty({rows, p.m}, x.options());
  }
  at::Tensor g_mix = at::empty({p.m, p.C}, x.options()), g_embed = at::zeros({p.bins, p.m}, x.options());
  at::Tensor g_b1, g_b2, g_w1, g_w2, g_s = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spectral_token_backward_cpu", [&] {
    using T = scalar_t;
    if (p.B > 0 && !use_kept) {
      const HalfWindowBases bases = half_window_bases(x.size(2), x.size(3), size, x.scalar_type());
      bins_and_mix<T>(x, bases, size, mix_weight, freq_embed, s.data_ptr<T>(), f.data_ptr<T>());
    }
    HeadGrads head = head_backward(f, p, grad, w1, b1, w2, b2, use_kept ? kept.data_ptr<T>() : nullptr);
    const at::Tensor& g_f = head.g_f;
    g_w1 = head.g_w1, g_b1 = head.g_b1, g_w2 = head.g_w2, g_b2 = head.g_b2;
    // The FreqMix gradients: C and m are small, one pass over g_f.
    const T *gf = g_f.data_ptr<T>(), *sp = s.data_ptr<T>(), *mix = mix_weight.data_ptr<T>();
    T *gm = g_mix.data_ptr<T>(), *ge = g_embed.data_ptr<T>();
    if (grad_bins) g_s = at::empty({p.B, p.C, size, size}, x.options());
    T* gs = grad_bins ? g_s.data_ptr<T>() : nullptr;
    std::vector<T> gm_t(p.C * p.m, T(0));  // g_mix transposed (C, m): the loops below run along m
    for (int64_t r = 0; r < rows; ++r) {
      const T* gfr = gf + r * p.m;
      const T* sr = sp + r * p.C;
      T* ger = ge + (r % p.bins) * p.m;
      for (int64_t j = 0; j < p.m; ++j) ger[j] += gfr[j];
      for (int64_t c = 0; c < p.C; ++c)
        for (int64_t j = 0; j < p.m; ++j) gm_t[c * p.m + j] += gfr[j] * sr[c];
      if (gs != nullptr) {
        const int64_t b = r / p.bins, q = r % p.bins;
        for (int64_t c = 0; c < p.C; ++c) {
          T acc = 0;
          for (int64_t j = 0; j < p.m; ++j) acc += gfr[j] * mix[j * p.C + c];
          gs[(b * p.C + c) * p.bins + q] = acc;
        }
      }
    }
    for (int64_t j = 0; j < p.m; ++j)
      for (int64_t c = 0; c < p.C; ++c) gm[j * p.C + c] = gm_t[c * p.m + j];
  });
  return {g_mix, g_embed, g_w1, g_b1, g_w2, g_b2, g_s};
}

// spectral_token's autograd in C++, for the same reason as eca_residual's
// (eca_attention_kernel.cpp): the adapter calls it every training step, and two Python
// round trips cost more than the fused head at its sizes. Through the dispatcher both
// ways, so torch.compile's fake tensors reach the fake kernels (spectral_token.py).
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (size, n) complex DFT basis of the centred window, exp(-2 pi i f t / n) / n for the
// window frequencies f = i - size/2, the phase reduced modulo n in integers first (as
// omnifm/ops/_dft.py's complex_basis).
at::Tensor window_basis(int64_t n, int64_t size, at::ScalarType real_dtype, const at::Device& device) {
  const auto longs = at::TensorOptions().dtype(at::kLong);
  const at::Tensor f = at::remainder(at::arange(size, longs) - size / 2, n);
  const at::Tensor phase = at::remainder(f.unsqueeze(1) * at::arange(n, longs).unsqueeze(0), n);
  const at::Tensor angle = phase.to(at::kDouble) * (6.283185307179586476925286766559 / static_cast<double>(n));
  const at::Tensor basis = at::polar(at::full_like(angle, 1.0 / static_cast<double>(n)), -angle);
  return basis.to(device, real_dtype == at::kDouble ? at::kComplexDouble : at::kComplexFloat);
}

// dL/dx from dL/d(log1p |X|) g_s (B, C, K, K), X the window of x: omnifm/ops/_dft.py's
// magnitude_grad(x, size, g_s, log=True), op for op.
at::Tensor log_magnitude_grad(const at::Tensor& x, int64_t size, const at::Tensor& g_s) {
  const at::Tensor a_h = window_basis(x.size(2), size, g_s.scalar_type(), x.device());
  const at::Tensor a_w = window_basis(x.size(3), size, g_s.scalar_type(), x.device());
  const at::Tensor X = at::matmul(at::matmul(a_h, x.to(g_s.scalar_type()).to(a_h.scalar_type())), a_w.transpose(0, 1));
  const at::Tensor g = g_s / (X.abs() + 1);
  const at::Tensor adjoint = at::matmul(at::matmul(a_h.transpose(0, 1), g * at::sgn(X).conj()), a_w);
  return at::real(adjoint).to(x.scalar_type()).contiguous();
}

using TokenFn = decltype(spectral_token_cpu);
using SavingFn = decltype(spectral_token_saving_cpu);
using TokenBackwardFn = decltype(spectral_token_backward_cpu);

const c10::TypedOperatorHandle<TokenFn>& token_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("omnifm::spectral_token", "").typed<TokenFn>();
  return op;
}

class SpectralTokenFunction : public torch::autograd::Function<SpectralTokenFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mix_weight,
                            const at::Tensor& freq_embed, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, int64_t size) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("omnifm::spectral_token_saving", "").typed<SavingFn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, mix_weight, freq_embed, w1, b1, w2, b2});
    ctx->saved_data["size"] = size;
    auto [out, kept] = op.call(x, mix_weight, freq_embed, w1, b1, w2, b2, size);
    ctx->saved_data["kept"] = kept;  // not an input or output: kept as data, like size
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::spectral_token_backward", "")
                               .typed<TokenBackwardFn>();
    const variable_list v = ctx->get_saved_variables();
    const int64_t size = ctx->saved_data["size"].toInt();
    const at::Tensor kept = ctx->saved_data["kept"].toTensor();
    const bool x_grad = ctx->needs_input_grad(0);
    auto [g_mix, g_embed, g_w1, g_b1, g_w2, g_b2, g_s] =
        op.call(grads[0].contiguous(), v[0], v[1], v[2], v[3], v[4], v[5], v[6], size, x_grad, kept);
    const at::Tensor g_x = x_grad ? log_magnitude_grad(v[0], size, g_s) : at::Tensor();
    return {g_x, g_mix, g_embed, g_w1, g_b1, g_w2, g_b2, at::Tensor()};
  }
};

at::Tensor spectral_token_autograd(const at::Tensor& x, const at::Tensor& mix_weight, const at::Tensor& freq_embed,
                                   const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                   const at::Tensor& b2, int64_t size) {
  bool needs_grad = false;
  for (const at::Tensor* t : {&x, &mix_weight, &freq_embed, &w1, &b1, &w2, &b2}) needs_grad |= t->requires_grad();
  if (!at::GradMode::is_enabled() || !needs_grad) {  // nothing to record: no activations to keep
    at::AutoDispatchBelowADInplaceOrView guard;
    return token_op().call(x, mix_weight, freq_embed, w1, b1, w2, b2, size);
  }
  return SpectralTokenFunction::apply(x, mix_weight, freq_embed, w1, b1, w2, b2, size);
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifm, Autograd, m) {
  m.impl("spectral_token", &spectral_token_autograd);
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("spectral_token", &spectral_token_cpu);
  m.impl("spectral_token_saving", &spectral_token_saving_cpu);
  m.impl("spectral_token_backward", &spectral_token_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifm
