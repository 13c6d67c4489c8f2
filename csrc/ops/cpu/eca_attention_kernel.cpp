// CPU kernels of the ECA core, Z = softmax(r . at^T) vp with k keys: per token row, k
// dot products of length d, a k-way softmax and a k-term sum of length dh. The op is
// memory-bound (it reads r once and writes Z once), so each row is streamed through
// once, in plain loops that the compiler vectorises; Q = r Wq is never formed. Rows go
// in chunks of kChunkRows, the unit of parallel work. The backward reads r and grad
// once, writes dr once, and sums d(at), d(vp) per chunk, then over chunks in a fixed
// order: the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "parallel.h"

namespace omnifm {
namespace cpu {
namespace {

constexpr int64_t kChunkRows = 256;
// Independent partial sums of a dot product: without -ffast-math the compiler may
// not reorder one running sum, but it vectorises kLanes separate ones.
constexpr int64_t kLanes = 16;

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

template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[i + l] * y[i + l];
  }
  T s = 0;
  for (; i < n; ++i) s += x[i] * y[i];
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// p (k) = softmax over the k keys of row . a_j, a (k, d).
template <typename T>
inline void probs(const T* row, const T* a, int64_t k, int64_t d, T* p) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    p[j] = dot(row, a + j * d, d);
    m = std::max(m, p[j]);
  }
  T s = 0;
  for (int64_t j = 0; j < k; ++j) {
    p[j] = std::exp(p[j] - m);
    s += p[j];
  }
  for (int64_t j = 0; j < k; ++j) p[j] /= s;
}

// out (n) = sum_j c_j m_j, m (k, n). out is one row: it stays in cache between terms.
template <typename T>
inline void combine(const T* c, const T* m, int64_t k, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = c[0] * m[i];
  for (int64_t j = 1; j < k; ++j) {
    const T cj = c[j], *mj = m + j * n;
    for (int64_t i = 0; i < n; ++i) out[i] += cj * mj[i];
  }
}

// acc (n) += c x (n)
template <typename T>
inline void axpy(T c, const T* x, int64_t n, T* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += c * x[i];
}

// z_batch: the distance between two samples' first rows of z (L * dh when z is (B, L, dh)).
template <typename T>
void forward(const T* r, const T* a, const T* vp, T* z, int64_t B, int64_t L, int64_t d, int64_t k, int64_t dh,
             int64_t z_batch) {
  const int64_t chunks = (L + kChunkRows - 1) / kChunkRows;
  parallel_tasks(B * chunks, B * L * k * (d + dh), [&](int64_t task) {
    std::vector<T> p(k);
    const int64_t b = task / chunks, l0 = (task % chunks) * kChunkRows;
    const int64_t l1 = std::min(L, l0 + kChunkRows);
    const T *ab = a + b * k * d, *vpb = vp + b * k * dh;
    for (int64_t l = l0; l < l1; ++l) {
      probs(r + (b * L + l) * d, ab, k, d, p.data());
      combine(p.data(), vpb, k, dh, z + b * z_batch + l * dh);
    }
  });
}

// da_part (B, chunks, k, d) and dvp_part (B, chunks, k, dh) must start at zero;
// g_batch: as forward's z_batch, for g.
template <typename T>
void backward(const T* g, const T* r, const T* a, const T* vp, T* dr, T* da_part, T* dvp_part, int64_t B,
              int64_t L, int64_t d, int64_t k, int64_t dh, int64_t chunks, int64_t g_batch) {
  parallel_tasks(B * chunks, 2 * B * L * k * (d + dh), [&](int64_t task) {
    std::vector<T> p(k), gl(k);
    const int64_t b = task / chunks, l0 = (task % chunks) * kChunkRows;
    const int64_t l1 = std::min(L, l0 + kChunkRows);
    const T *ab = a + b * k * d, *vpb = vp + b * k * dh;
    T *da = da_part + task * k * d, *dvp = dvp_part + task * k * dh;
    for (int64_t l = l0; l < l1; ++l) {
      const T *row = r + (b * L + l) * d, *grow = g + b * g_batch + l * dh;
      probs(row, ab, k, d, p.data());
      // d logits = p * (d p - sum p d p), with d p_j = g . vp_j
      T s = 0;
      for (int64_t j = 0; j < k; ++j) {
        gl[j] = dot(grow, vpb + j * dh, dh);
        s += p[j] * gl[j];
      }
      for (int64_t j = 0; j < k; ++j) gl[j] = p[j] * (gl[j] - s);
      combine(gl.data(), ab, k, d, dr + (b * L + l) * d);
      for (int64_t j = 0; j < k; ++j) {
        axpy(gl[j], row, d, da + j * d);
        axpy(p[j], grow, dh, dvp + j * dh);
      }
    }
  });
}

// out (B, n) = sum over c of part (B, chunks, n), c in increasing order.
template <typename T>
void sum_chunks(const T* part, int64_t B, int64_t chunks, int64_t n, T* out) {
  for (int64_t b = 0; b < B; ++b) {
    T* o = out + b * n;
    std::fill(o, o + n, T(0));
    for (int64_t c = 0; c < chunks; ++c) axpy(T(1), part + (b * chunks + c) * n, n, o);
  }
}

}  // namespace

at::Tensor eca_core_cpu(const at::Tensor& r_in, const at::Tensor& at_in, const at::Tensor& vp_in) {
  check_core(r_in, at_in, vp_in);
  const at::Tensor r = r_in.contiguous(), a = at_in.contiguous(), vp = vp_in.contiguous();
  const int64_t B = r.size(0), L = r.size(1), d = r.size(2), k = a.size(1), dh = vp.size(2);
  at::Tensor z = new_output({B, L, dh}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "eca_core_cpu", [&] {
    forward(r.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), vp.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), B, L,
            d, k, dh, L * dh);
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
  const int64_t chunks = (L + kChunkRows - 1) / kChunkRows;
  at::Tensor dr = new_output({B, L, d}, r.options());
  at::Tensor da_part = at::zeros({B, chunks, k, d}, r.options());
  at::Tensor dvp_part = at::zeros({B, chunks, k, dh}, r.options());
  at::Tensor da = new_output({B, k, d}, r.options()), dvp = new_output({B, k, dh}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "eca_core_backward_cpu", [&] {
    backward(g.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), vp.data_ptr<scalar_t>(),
             dr.data_ptr<scalar_t>(), da_part.data_ptr<scalar_t>(), dvp_part.data_ptr<scalar_t>(), B, L, d, k, dh,
             chunks, L * dh);
    sum_chunks(da_part.data_ptr<scalar_t>(), B, chunks, k * d, da.data_ptr<scalar_t>());
    sum_chunks(dvp_part.data_ptr<scalar_t>(), B, chunks, k * dh, dvp.data_ptr<scalar_t>());
  });
  return {dr, da, dvp};
}

// --- eca_residual: y = x + Z^T for channel-first tokens x (B, d, L) (a CNN's feature
// map, flattened), Z = ECA(x^T, protos, wq, wk, wv, value_bias) with wv (d, d). The
// logits and values have only k rows per sample, so the whole op, its projections
// and its backward are a few batched products in this layout (L is the contiguous
// axis); one call each way replaces ~15 PyTorch ops and their autograd nodes, which
// cost more than the arithmetic at a small backbone's sizes.
namespace {

struct Residual {
  at::Tensor kq, at_, vp, p;  // protos Wk (B,k,dh); at = kq Wq^T / sqrt(dh) (B,k,d); values (B,k,d); softmax (B,k,L)
};

// protos (B, k >= 1, d) and the query and key projections wq, wk (d, dh), for tokens
// (named `tokens`) of B samples and width d.
void check_keys(const at::Tensor& protos, const at::Tensor& wq, const at::Tensor& wk, int64_t B, int64_t d,
                const char* tokens) {
  TORCH_CHECK_VALUE(protos.dim() == 3 && protos.size(0) == B && protos.size(2) == d && protos.size(1) >= 1,
                    "protos: expected (B, k >= 1, d) matching ", tokens);
  TORCH_CHECK_VALUE(wq.dim() == 2 && wq.size(0) == d && wq.size(1) >= 1, "wq: expected (d, dh)");
  TORCH_CHECK_VALUE(wk.sizes() == wq.sizes(), "wk: expected the shape of wq");
}

void check_residual(const at::Tensor& x, const at::Tensor& protos, const at::Tensor& wq, const at::Tensor& wk,
                    const at::Tensor& wv, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x: expected (B, d, L)");
  const int64_t d = x.size(1);
  check_keys(protos, wq, wk, x.size(0), d, "x");
  TORCH_CHECK_VALUE(wv.dim() == 2 && wv.size(0) == d && wv.size(1) == d, "wv: expected (d, d)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x: the CPU kernel takes float32 or float64, got ", x.scalar_type());
  for (const at::Tensor* t : {&protos, &wq, &wk, &wv})
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "protos, wq, wk, wv: expected the dtype of x");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d, "value_bias: expected (d,)");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "value_bias: expected the dtype of x");
  }
}

Residual residual_parts(const at::Tensor& x, const at::Tensor& protos, const at::Tensor& wq, const at::Tensor& wk,
                        const at::Tensor& wv, const c10::optional<at::Tensor>& bias) {
  const int64_t B = protos.size(0), k = protos.size(1), d = protos.size(2);
  Residual r;
  r.kq = at::matmul(protos, wk);
  r.at_ = at::matmul(r.kq, wq.t()).div_(std::sqrt(static_cast<double>(wq.size(1))));
  r.vp = bias.has_value() ? at::addmm(*bias, protos.reshape({B * k, d}), wv).view({B, k, d}) : at::matmul(protos, wv);
  r.p = at::softmax(at::bmm(r.at_, x), 1);  // over the k keys
  return r;
}

}  // namespace

at::Tensor eca_residual_cpu(const at::Tensor& x_in, const at::Tensor& protos, const at::Tensor& wq,
                            const at::Tensor& wk, const at::Tensor& wv, const c10::optional<at::Tensor>& bias) {
  check_residual(x_in, protos, wq, wk, wv, bias);
  const at::Tensor x = x_in.contiguous();
  const Residual r = residual_parts(x, protos, wq, wk, wv, bias);
  return at::baddbmm(x, r.vp.transpose(1, 2), r.p);  // x + vp^T p
}

// Gradients of sum(grad * eca_residual(...)) for x, protos, wq, wk, wv and value_bias
// (an empty tensor when there is none).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> eca_residual_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& protos, const at::Tensor& wq,
    const at::Tensor& wk, const at::Tensor& wv, const c10::optional<at::Tensor>& bias) {
  check_residual(x_in, protos, wq, wk, wv, bias);
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(), "grad: expected the shape of x");
  const at::Tensor x = x_in.contiguous(), g = grad_in.to(x.scalar_type()).contiguous();
  const Residual r = residual_parts(x, protos, wq, wk, wv, bias);
  const int64_t B = protos.size(0), k = protos.size(1), d = protos.size(2), dh = wq.size(1);
  const double scale = std::sqrt(static_cast<double>(dh));
  // Through the softmax: d logits = p * (d p - sum_j p d p), d p = vp g.
  const at::Tensor g_logits = at::_softmax_backward_data(at::bmm(r.vp, g), r.p, 1, x.scalar_type());
  at::Tensor g_x = at::baddbmm(g, r.at_.transpose(1, 2), g_logits);  // the residual path plus at^T d logits
  const at::Tensor g_at = at::bmm(g_logits, x.transpose(1, 2)).reshape({B * k, d});
  const at::Tensor g_vp = at::bmm(r.p, g.transpose(1, 2)).reshape({B * k, d});
  const at::Tensor protos2 = protos.reshape({B * k, d});
  // at = (protos Wk) Wq^T / sqrt(dh); vp = protos Wv + b.
  const at::Tensor g_kq = at::mm(g_at, wq).div_(scale);  // (B*k, dh)
  at::Tensor g_wq = at::mm(g_at.t(), r.kq.reshape({B * k, dh})).div_(scale);
  at::Tensor g_wk = at::mm(protos2.t(), g_kq);
  at::Tensor g_wv = at::mm(protos2.t(), g_vp);
  at::Tensor g_protos = at::addmm(at::mm(g_vp, wv.t()), g_kq, wk.t()).view({B, k, d});
  at::Tensor g_bias = bias.has_value() ? g_vp.sum(0) : at::empty({0}, x.options());
  return {g_x, g_protos, g_wq, g_wk, g_wv, g_bias};
}

// --- eca_psp: [Z out_weight^T | r | suffix] for tokens r (B, L, d), Z = ECA(r, protos,
// wq, wk, wv): the adapter's sequence mode with PSP in one call each way. The values are
// mapped on the k prototype rows, (protos Wv) out_weight^T, so the mapping costs k rows
// per sample (not a (dh, d) weight product); the prefix, the tokens and the prompts are
// written in one output, and the backward returns the tokens' gradient with both of
// their uses summed and the prompts' summed over the batch. Past the four projections
// (BLAS), everything runs in this file's loops, not in ATen's softmax, bmm and copy
// kernels: inside a training step each such call finds its code cold (the backbone ran
// in between), ~10-50 us apiece at the adapter's sizes, more than its arithmetic.
namespace {

struct Psp {
  // protos as (B*k, d) rows; protos Wk; kq Wq^T / sqrt(dh); protos Wv; pv out^T.
  at::Tensor protos2, kq, at_, pv, vp;
};

void check_psp(const at::Tensor& r, const at::Tensor& protos, const at::Tensor& wq, const at::Tensor& wk,
               const at::Tensor& wv, const at::Tensor& out_weight, const at::Tensor& suffix) {
  TORCH_CHECK_VALUE(r.dim() == 3, "r: expected (B, L, d)");
  const int64_t d = r.size(2);
  check_keys(protos, wq, wk, r.size(0), d, "r");
  TORCH_CHECK_VALUE(wv.dim() == 2 && wv.size(0) == d && wv.size(1) >= 1, "wv: expected (d, dv)");
  TORCH_CHECK_VALUE(out_weight.dim() == 2 && out_weight.size(0) == d && out_weight.size(1) == wv.size(1),
                    "out_weight: expected (d, dv)");
  TORCH_CHECK_VALUE(suffix.dim() == 2 && suffix.size(1) == d, "suffix: expected (p, d)");
  TORCH_CHECK_TYPE(r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble,
                   "r: the CPU kernel takes float32 or float64, got ", r.scalar_type());
  for (const at::Tensor* t : {&protos, &wq, &wk, &wv, &out_weight, &suffix})
    TORCH_CHECK_TYPE(t->scalar_type() == r.scalar_type(), "protos, wq, wk, wv, out_weight, suffix: expected the dtype of r");
}

template <typename T>
void divide(T* x, int64_t n, T by) {
  for (int64_t i = 0; i < n; ++i) x[i] /= by;
}

// The projections: four 2-D products over the B*k prototype rows (BLAS, which the
// backbone's linear layers keep warm); the per-token work runs in the core's loops.
Psp psp_parts(const at::Tensor& protos, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
              const at::Tensor& out_weight) {
  const int64_t B = protos.size(0), k = protos.size(1), d = protos.size(2);
  Psp s;
  s.protos2 = protos.reshape({B * k, d});
  s.kq = at::mm(s.protos2, wk);
  s.at_ = at::mm(s.kq, wq.t());
  AT_DISPATCH_FLOATING_TYPES(s.at_.scalar_type(), "eca_psp_scale", [&] {
    divide(s.at_.data_ptr<scalar_t>(), s.at_.numel(), static_cast<scalar_t>(std::sqrt(static_cast<double>(wq.size(1)))));
  });
  s.pv = at::mm(s.protos2, wv);
  s.vp = at::mm(s.pv, out_weight.t());
  return s;
}

}  // namespace

at::Tensor eca_psp_cpu(const at::Tensor& r_in, const at::Tensor& protos, const at::Tensor& wq, const at::Tensor& wk,
                       const at::Tensor& wv, const at::Tensor& out_weight, const at::Tensor& suffix_in) {
  check_psp(r_in, protos, wq, wk, wv, out_weight, suffix_in);
  const at::Tensor r = r_in.contiguous(), suffix = suffix_in.contiguous();
  const int64_t B = r.size(0), L = r.size(1), d = r.size(2), p = suffix.size(0), k = protos.size(1);
  const Psp s = psp_parts(protos, wq, wk, wv, out_weight);
  at::Tensor out = new_output({B, 2 * L + p, d}, r.options());
  const int64_t rows = (2 * L + p) * d;  // one sample's output
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "eca_psp_cpu", [&] {
    const scalar_t *rp = r.data_ptr<scalar_t>(), *sp = suffix.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Z out^T = softmax(r at^T) vp, written as each sample's first L rows.
    forward(rp, s.at_.data_ptr<scalar_t>(), s.vp.data_ptr<scalar_t>(), o, B, L, d, k, d, rows);
    for (int64_t b = 0; b < B; ++b) {
      std::copy(rp + b * L * d, rp + (b + 1) * L * d, o + b * rows + L * d);
      std::copy(sp, sp + p * d, o + b * rows + 2 * L * d);
    }
  });
  return out;
}

// Gradients of sum(grad * eca_psp(...)) for r, protos, wq, wk, wv, out_weight, suffix.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> eca_psp_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& r_in, const at::Tensor& protos, const at::Tensor& wq,
    const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& out_weight, const at::Tensor& suffix) {
  check_psp(r_in, protos, wq, wk, wv, out_weight, suffix);
  const at::Tensor r = r_in.contiguous();
  const int64_t B = r.size(0), L = r.size(1), d = r.size(2), p = suffix.size(0), k = protos.size(1);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({B, 2 * L + p, d}), "grad: expected (B, 2L + p, d)");
  const at::Tensor g = grad_in.to(r.scalar_type()).contiguous();
  const Psp s = psp_parts(protos, wq, wk, wv, out_weight);
  const int64_t chunks = (L + kChunkRows - 1) / kChunkRows, rows = (2 * L + p) * d;
  at::Tensor g_r = new_output({B, L, d}, r.options());
  at::Tensor g_at = new_output({B * k, d}, r.options()), g_vp = new_output({B * k, d}, r.options());
  at::Tensor g_suffix = new_output({p, d}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "eca_psp_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gr = g_r.data_ptr<scalar_t>();
    std::vector<scalar_t> da_part(B * chunks * k * d, scalar_t(0)), dvp_part(B * chunks * k * d, scalar_t(0));
    // Through the prefix: the core's gradients for r (its use as queries), at and vp.
    backward(gp, r.data_ptr<scalar_t>(), s.at_.data_ptr<scalar_t>(), s.vp.data_ptr<scalar_t>(), gr, da_part.data(),
             dvp_part.data(), B, L, d, k, d, chunks, rows);
    sum_chunks(da_part.data(), B, chunks, k * d, g_at.data_ptr<scalar_t>());
    sum_chunks(dvp_part.data(), B, chunks, k * d, g_vp.data_ptr<scalar_t>());
    // at = kq Wq^T / sqrt(dh): the scale moves onto its gradient once, for both products below.
    divide(g_at.data_ptr<scalar_t>(), g_at.numel(), static_cast<scalar_t>(std::sqrt(static_cast<double>(wq.size(1)))));
    // The tokens' own rows, then the prompts' rows summed over the batch in order.
    scalar_t* gs = g_suffix.data_ptr<scalar_t>();
    std::fill(gs, gs + p * d, scalar_t(0));
    for (int64_t b = 0; b < B; ++b) {
      axpy(scalar_t(1), gp + b * rows + L * d, L * d, gr + b * L * d);
      axpy(scalar_t(1), gp + b * rows + 2 * L * d, p * d, gs);
    }
  });
  // vp = (protos Wv) out^T, at = (protos Wk) Wq^T / sqrt(dh).
  const at::Tensor g_kq = at::mm(g_at, wq), g_pv = at::mm(g_vp, out_weight);
  at::Tensor g_wq = at::mm(g_at.t(), s.kq), g_wk = at::mm(s.protos2.t(), g_kq);
  at::Tensor g_wv = at::mm(s.protos2.t(), g_pv), g_out = at::mm(g_vp.t(), s.pv);
  at::Tensor g_protos = at::addmm(at::mm(g_pv, wv.t()), g_kq, wk.t()).view({B, k, d});
  return {g_r, g_protos, g_wq, g_wk, g_wv, g_out, g_suffix};
}

// The autograd of eca_core, eca_residual and eca_psp in C++: the adapter calls one of them once
// per training step, and a Python-registered backward costs two Python round trips
// (the forward's wrapper and the backward's) that are slower than the op itself at a
// small backbone's sizes.
// Both directions go through the dispatcher, so fake tensors (torch.compile) reach the
// fake kernels registered in omnifm/ops/eca_attention.py.
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class EcaResidualFunction : public torch::autograd::Function<EcaResidualFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& protos,
                            const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                            const c10::optional<at::Tensor>& bias) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::eca_residual", "")
                               .typed<decltype(eca_residual_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, protos, wq, wk, wv, bias.has_value() ? *bias : at::Tensor()});
    ctx->saved_data["has_bias"] = bias.has_value();
    return op.call(x, protos, wq, wk, wv, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::eca_residual_backward", "")
                               .typed<decltype(eca_residual_backward_cpu)>();
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const c10::optional<at::Tensor> bias = has_bias ? c10::optional<at::Tensor>(saved[5]) : c10::nullopt;
    auto [g_x, g_protos, g_wq, g_wk, g_wv, g_bias] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], bias);
    return {g_x, g_protos, g_wq, g_wk, g_wv, has_bias ? g_bias : at::Tensor()};
  }
};

class EcaPspFunction : public torch::autograd::Function<EcaPspFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& r, const at::Tensor& protos, const at::Tensor& wq,
                            const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& out_weight,
                            const at::Tensor& suffix) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("omnifm::eca_psp", "").typed<decltype(eca_psp_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({r, protos, wq, wk, wv, out_weight, suffix});
    return op.call(r, protos, wq, wk, wv, out_weight, suffix);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::eca_psp_backward", "")
                               .typed<decltype(eca_psp_backward_cpu)>();
    const variable_list v = ctx->get_saved_variables();
    auto [g_r, g_protos, g_wq, g_wk, g_wv, g_out, g_suffix] = op.call(grads[0], v[0], v[1], v[2], v[3], v[4], v[5], v[6]);
    return {g_r, g_protos, g_wq, g_wk, g_wv, g_out, g_suffix};
  }
};

class EcaCoreFunction : public torch::autograd::Function<EcaCoreFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& r, const at::Tensor& at_, const at::Tensor& vp) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("omnifm::eca_core", "").typed<decltype(eca_core_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({r, at_, vp});
    return op.call(r, at_, vp);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::eca_core_backward", "")
                               .typed<decltype(eca_core_backward_cpu)>();
    const variable_list saved = ctx->get_saved_variables();
    auto [g_r, g_at, g_vp] = op.call(grads[0].contiguous(), saved[0], saved[1], saved[2]);
    return {g_r, g_at, g_vp};
  }
};

at::Tensor eca_psp_autograd(const at::Tensor& r, const at::Tensor& protos, const at::Tensor& wq, const at::Tensor& wk,
                            const at::Tensor& wv, const at::Tensor& out_weight, const at::Tensor& suffix) {
  return EcaPspFunction::apply(r, protos, wq, wk, wv, out_weight, suffix);
}

at::Tensor eca_core_autograd(const at::Tensor& r, const at::Tensor& at_, const at::Tensor& vp) {
  return EcaCoreFunction::apply(r, at_, vp);
}

at::Tensor eca_residual_autograd(const at::Tensor& x, const at::Tensor& protos, const at::Tensor& wq,
                                 const at::Tensor& wk, const at::Tensor& wv, const c10::optional<at::Tensor>& bias) {
  return EcaResidualFunction::apply(x, protos, wq, wk, wv, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifm, Autograd, m) {
  m.impl("eca_core", &eca_core_autograd);
  m.impl("eca_residual", &eca_residual_autograd);
  m.impl("eca_psp", &eca_psp_autograd);
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("eca_core", &eca_core_cpu);
  m.impl("eca_core_backward", &eca_core_backward_cpu);
  m.impl("eca_residual", &eca_residual_cpu);
  m.impl("eca_residual_backward", &eca_residual_backward_cpu);
  m.impl("eca_psp", &eca_psp_cpu);
  m.impl("eca_psp_backward", &eca_psp_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifm
