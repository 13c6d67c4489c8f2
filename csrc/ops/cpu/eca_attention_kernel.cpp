// CPU kernels of the ECA core: with k keys only, every token row needs k dot products
// for its logits, a k-way softmax and a k-term sum for its output. One pass over the
// rows reads r once and writes Z once; Q = r Wq is never formed. The backward reads
// r and grad once, writes dr once, and reduces d(at), d(vp) per chunk of rows
// (fixed order, so the result is deterministic).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "check.h"

namespace omnifm {
namespace cpu {
namespace {

constexpr int64_t kChunkRows = 256;

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Softmax over the k logits of one row, in place.
template <typename T>
inline void softmax(T* x, int64_t k) {
  T mx = x[0];
  for (int64_t j = 1; j < k; ++j) mx = std::max(mx, x[j]);
  T sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    x[j] = std::exp(x[j] - mx);
    sum += x[j];
  }
  for (int64_t j = 0; j < k; ++j) x[j] /= sum;
}

void check_core(const at::Tensor& r, const at::Tensor& at_, const at::Tensor& vp) {
  TORCH_CHECK_VALUE(r.dim() == 3, "r: expected (B, L, d)");
  TORCH_CHECK_VALUE(at_.dim() == 3 && at_.size(0) == r.size(0) && at_.size(2) == r.size(2),
                    "at: expected (B, k, d) matching r");
  TORCH_CHECK_VALUE(vp.dim() == 3 && vp.size(0) == r.size(0) && vp.size(1) == at_.size(1),
                    "vp: expected (B, k, dh) matching at");
  TORCH_CHECK_VALUE(at_.size(1) >= 1, "at: needs at least one key");
  TORCH_CHECK_TYPE(r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble,
                   "r: the CPU kernel takes float32 or float64, got ", r.scalar_type());
  TORCH_CHECK_TYPE(at_.scalar_type() == r.scalar_type() && vp.scalar_type() == r.scalar_type(),
                   "at, vp: expected the dtype of r");
}

}  // namespace

at::Tensor eca_core_cpu(const at::Tensor& r_in, const at::Tensor& at_in, const at::Tensor& vp_in) {
  check_core(r_in, at_in, vp_in);
  const at::Tensor r = r_in.contiguous(), a = at_in.contiguous(), vp = vp_in.contiguous();
  const int64_t B = r.size(0), L = r.size(1), d = r.size(2), k = a.size(1), dh = vp.size(2);
  at::Tensor z = new_output({B, L, dh}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "eca_core_cpu", [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* vpp = vp.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> p(k);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L;
        const scalar_t* rr = rp + row * d;
        for (int64_t j = 0; j < k; ++j) p[j] = dot(rr, ap + (b * k + j) * d, d);
        softmax(p.data(), k);
        scalar_t* zr = zp + row * dh;
        std::fill(zr, zr + dh, scalar_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* v = vpp + (b * k + j) * dh;
          for (int64_t c = 0; c < dh; ++c) zr[c] += p[j] * v[c];
        }
      }
    });
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eca_core_backward_cpu(const at::Tensor& grad_in,
                                                                     const at::Tensor& r_in,
                                                                     const at::Tensor& at_in,
                                                                     const at::Tensor& vp_in) {
  check_core(r_in, at_in, vp_in);
  const at::Tensor g = grad_in.contiguous().to(r_in.scalar_type());
  const at::Tensor r = r_in.contiguous(), a = at_in.contiguous(), vp = vp_in.contiguous();
  const int64_t B = r.size(0), L = r.size(1), d = r.size(2), k = a.size(1), dh = vp.size(2);
  TORCH_CHECK_VALUE(g.sizes() == at::IntArrayRef({B, L, dh}), "grad: expected (B, L, dh)");
  const int64_t chunks = std::max<int64_t>(1, (L + kChunkRows - 1) / kChunkRows);
  at::Tensor dr = new_output({B, L, d}, r.options());
  // Per-chunk partial sums, reduced in a fixed order below.
  at::Tensor da_part = at::zeros({B, chunks, k, d}, r.options());
  at::Tensor dvp_part = at::zeros({B, chunks, k, dh}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "eca_core_backward_cpu", [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* vpp = vp.data_ptr<scalar_t>();
    scalar_t* drp = dr.data_ptr<scalar_t>();
    scalar_t* dap = da_part.data_ptr<scalar_t>();
    scalar_t* dvpp = dvp_part.data_ptr<scalar_t>();
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> p(k), gl(k);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, c = task % chunks;
        scalar_t* da = dap + task * k * d;
        scalar_t* dv = dvpp + task * k * dh;
        const int64_t l1 = std::min(L, (c + 1) * kChunkRows);
        for (int64_t l = c * kChunkRows; l < l1; ++l) {
          const int64_t row = b * L + l;
          const scalar_t* rr = rp + row * d;
          const scalar_t* gr = gp + row * dh;
          for (int64_t j = 0; j < k; ++j) p[j] = dot(rr, ap + (b * k + j) * d, d);
          softmax(p.data(), k);
          // d logits = p * (dp - <p, dp>), dp_j = <grad, vp_j>.
          scalar_t mean = 0;
          for (int64_t j = 0; j < k; ++j) {
            gl[j] = dot(gr, vpp + (b * k + j) * dh, dh);
            mean += p[j] * gl[j];
          }
          scalar_t* drr = drp + row * d;
          std::fill(drr, drr + d, scalar_t(0));
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t glj = p[j] * (gl[j] - mean);
            const scalar_t* aj = ap + (b * k + j) * d;
            scalar_t* daj = da + j * d;
            for (int64_t i = 0; i < d; ++i) {
              drr[i] += glj * aj[i];
              daj[i] += glj * rr[i];
            }
            scalar_t* dvj = dv + j * dh;
            for (int64_t i = 0; i < dh; ++i) dvj[i] += p[j] * gr[i];
          }
        }
      }
    });
  });
  return {dr, da_part.sum(1), dvp_part.sum(1)};
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("eca_core", &eca_core_cpu);
  m.impl("eca_core_backward", &eca_core_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifm
