// CPU kernels of the ECA core: with k keys only, every token row needs k dot products
// for its logits, a k-way softmax and a k-term sum for its output. Chunks of rows run
// in parallel and stay in cache between their steps, so r is read from memory once
// and Z written once; Q = r Wq is never formed. The backward reads r and grad once,
// writes dr once, and reduces d(at), d(vp) per chunk of rows (fixed order, so the
// result is deterministic).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "check.h"

namespace omnifm {
namespace cpu {
namespace {

constexpr int64_t kChunkRows = 256;

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
  const int64_t B = r.size(0), L = r.size(1), dh = vp.size(2);
  const int64_t chunks = (L + kChunkRows - 1) / kChunkRows;
  at::Tensor z = new_output({B, L, dh}, r.options());
  // Per chunk of rows: logits = r_c at_b^T (rows, k), softmax, Z_c = p vp_b, written
  // in place. BLAS does the vector work; r and Z each cross memory once.
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, l0 = (task % chunks) * kChunkRows;
      const int64_t rows = std::min(kChunkRows, L - l0);
      at::Tensor p = at::softmax(at::mm(r[b].narrow(0, l0, rows), a[b].t()), 1);
      at::Tensor zc = z[b].narrow(0, l0, rows);
      at::mm_out(zc, p, vp[b]);
    }
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
  // Per-chunk partial sums of d(at) and d(vp), reduced in a fixed order below.
  at::Tensor da_part = at::zeros({B, chunks, k, d}, r.options());
  at::Tensor dvp_part = at::zeros({B, chunks, k, dh}, r.options());
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks, l0 = c * kChunkRows;
      const int64_t rows = std::min(kChunkRows, L - l0);
      if (rows <= 0) continue;
      const at::Tensor rc = r[b].narrow(0, l0, rows), gc = g[b].narrow(0, l0, rows);
      const at::Tensor p = at::softmax(at::mm(rc, a[b].t()), 1);  // (rows, k)
      const at::Tensor gp = at::mm(gc, vp[b].t());                 // d p
      const at::Tensor gl = p * (gp - (p * gp).sum(1, true));      // d logits
      at::Tensor drc = dr[b].narrow(0, l0, rows);
      at::mm_out(drc, gl, a[b]);
      at::Tensor dap = da_part[b][c], dvpp = dvp_part[b][c];
      at::mm_out(dap, gl.t(), rc);
      at::mm_out(dvpp, p.t(), gc);
    }
  });
  return {dr, da_part.sum(1), dvp_part.sum(1)};
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("eca_core", &eca_core_cpu);
  m.impl("eca_core_backward", &eca_core_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifm
