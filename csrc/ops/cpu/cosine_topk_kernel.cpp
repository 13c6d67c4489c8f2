// CPU kernel: cosine top-k over a bank streamed in tiles of kTileRows rows. Each tile
// is multiplied against a block of queries into a reused buffer (BLAS), and every
// query keeps a running top-k heap; the (B, M) similarity matrix never exists.
// score = ((q . b) * rq) * rb with r = 1 / max(|v|, eps), the same expression as the
// reference (the same ATen norm, and the BLAS product of a tile equals the full
// product's), so the scores match it bit for bit and exact ties (duplicated rows) stay
// ties, broken by the lower index.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "topk_heap.h"

namespace omnifm {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 1024;
constexpr int64_t kQueryBlock = 4096;  // bounds the similarity buffer: 16 MiB in float32
constexpr double kEps = 1e-12;

// 1 / max(|row|, eps) of each row of a (n, d) block. The norm is the reference's own
// ATen call, so the scores match it bit for bit; the clamp and the reciprocal are
// exact in any form (IEEE max and division), so they run here in one loop with the
// finiteness check, not as four more ATen calls (each costs more than a small bank's
// arithmetic). The first non-finite norm (a non-finite entry, or a norm that
// overflows) is reported at global row offset + i.
template <typename T>
at::Tensor inverse_norms(const at::Tensor& rows, int64_t offset, int64_t& bad_row) {
  at::Tensor norms = at::linalg_vector_norm(rows, 2, {-1}).contiguous();
  T* v = norms.data_ptr<T>();
  for (int64_t i = 0; i < norms.numel(); ++i) {
    if (!std::isfinite(v[i]) && bad_row < 0) bad_row = offset + i;
    v[i] = T(1) / std::max(v[i], static_cast<T>(kEps));
  }
  return norms;
}

template <typename T>
void topk_impl(const at::Tensor& q, const at::Tensor& bank, int64_t k, int64_t n_valid,
               at::Tensor& scores, at::Tensor& indices) {
  const int64_t B = q.size(0), d = q.size(1);
  const auto dtype = q.scalar_type();
  int64_t bad_query = -1, bad_row = -1;
  const at::Tensor rq_t = inverse_norms<T>(q, 0, bad_query);
  TORCH_CHECK_VALUE(bad_query < 0, "queries: row ", bad_query, " is not finite");
  const T* rq = rq_t.data_ptr<T>();

  // Per bank tile: one BLAS call over a block of queries (BLAS threads it well),
  // then the selection in parallel over queries. The buffers are allocated once: a
  // fresh MiB-sized buffer per tile would be mmap'ed and unmapped every time.
  const int64_t qblock = std::min(B, kQueryBlock);
  at::Tensor sim_buf = at::empty({qblock, kTileRows}, q.options());
  const bool convert = bank.scalar_type() != dtype;
  at::Tensor tile_buf = convert ? at::empty({kTileRows, d}, q.options()) : at::Tensor();
  std::vector<TopK<T>> heaps(B, TopK<T>(k));
  for (int64_t r0 = 0; r0 < n_valid; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n_valid - r0);
    at::Tensor tile = bank.slice(0, r0, r0 + rows);
    if (convert) tile = tile_buf.narrow(0, 0, rows).copy_(tile);
    const at::Tensor rb = inverse_norms<T>(tile, r0, bad_row);
    const T* rb_p = rb.data_ptr<T>();
    for (int64_t q0 = 0; q0 < B; q0 += qblock) {
      const int64_t nq = std::min(qblock, B - q0);
      at::Tensor sim = sim_buf.narrow(0, 0, nq).narrow(1, 0, rows);
      at::mm_out(sim, q.slice(0, q0, q0 + nq), tile.t());
      const T* s = sim.data_ptr<T>();
      const int64_t ld = sim.stride(0);
      auto select = [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          TopK<T>& h = heaps[q0 + i];
          const T rqi = rq[q0 + i];
          const T* srow = s + i * ld;
          T thr = h.threshold();
          // Blocks of 16: score and test branch-free (vectorises); only a block that
          // holds a candidate touches the heap.
          for (int64_t j0 = 0; j0 < rows; j0 += 16) {
            const int64_t n = std::min<int64_t>(16, rows - j0);
            T block[16];
            int hit = 0;
            for (int64_t jj = 0; jj < n; ++jj) {
              block[jj] = (srow[j0 + jj] * rqi) * rb_p[j0 + jj];
              hit |= block[jj] > thr;
            }
            if (!hit) continue;
            for (int64_t jj = 0; jj < n; ++jj) {
              if (block[jj] > thr) {
                h.offer(block[jj], r0 + j0 + jj);
                thr = h.threshold();
              }
            }
          }
        }
      };
      at::parallel_for(0, nq, 16, select);
    }
  }
  TORCH_CHECK_VALUE(bad_row < 0, "bank: row ", bad_row, " is not finite (or its norm overflows)");

  T* out_s = scores.data_ptr<T>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      heaps[b].write_sorted(out_s + b * k, out_i + b * k);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cosine_topk_cpu(const at::Tensor& queries, const at::Tensor& bank,
                                                   int64_t k, int64_t n_valid) {
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries: expected (B, d), got ", queries.dim(), " dims");
  TORCH_CHECK_VALUE(bank.dim() == 2, "bank: expected (M, d), got ", bank.dim(), " dims");
  TORCH_CHECK_VALUE(bank.size(1) == queries.size(1), "bank: expected d=", queries.size(1), ", got ", bank.size(1));
  TORCH_CHECK_TYPE(queries.scalar_type() == at::kFloat || queries.scalar_type() == at::kDouble,
                   "queries: the CPU kernel takes float32 or float64, got ", queries.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(bank.scalar_type()), "bank: expected a floating-point tensor");
  TORCH_CHECK_VALUE(n_valid >= 1 && n_valid <= bank.size(0), "n_valid: must be in [1, ", bank.size(0), "], got ", n_valid);
  TORCH_CHECK_VALUE(k >= 1 && k <= n_valid, "k: must be in [1, n_valid=", n_valid, "], got ", k);
  const auto dtype = (queries.scalar_type() == at::kDouble || bank.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const at::Tensor q = queries.to(dtype).contiguous();
  const at::Tensor b = bank.contiguous();
  const int64_t B = q.size(0);
  at::Tensor scores = new_output({B, k}, q.options());
  at::Tensor indices = at::full({B, k}, -1, q.options().dtype(at::kLong));
  if (B == 0) return {scores, indices};
  if (dtype == at::kDouble) {
    topk_impl<double>(q, b, k, n_valid, scores, indices);
  } else {
    topk_impl<float>(q, b, k, n_valid, scores, indices);
  }
  return {scores, indices};
}

namespace {

// Gradients of one query's selected scores, ((q . b) rq) rb with r = 1 / max(|v|, eps):
// w = grad * rq * rb; d/dq = w (b - (q . b) rq^2 q), d/db = w (q - (q . b) rb^2 b), where
// a norm's own derivative vanishes while its eps clamp is active. rows (k, d) are the
// selected bank rows; grad_rows receives d/db for each of them.
template <typename T>
void query_backward(const T* q, const T* rows, const T* grad, int64_t k, int64_t d, T* grad_q, T* grad_rows) {
  const T eps = static_cast<T>(kEps);
  T qq = 0;
  for (int64_t i = 0; i < d; ++i) qq += q[i] * q[i];
  const T q_norm = std::sqrt(qq), rq = T(1) / std::max(q_norm, eps), q_live = q_norm > eps ? T(1) : T(0);
  std::fill(grad_q, grad_q + d, T(0));
  for (int64_t j = 0; j < k; ++j) {
    const T* b = rows + j * d;
    T bb = 0, dot = 0;
    for (int64_t i = 0; i < d; ++i) bb += b[i] * b[i], dot += q[i] * b[i];
    const T b_norm = std::sqrt(bb), rb = T(1) / std::max(b_norm, eps), b_live = b_norm > eps ? T(1) : T(0);
    const T w = grad[j] * rq * rb, cq = dot * rq * rq * q_live, cb = dot * rb * rb * b_live;
    T* gb = grad_rows + j * d;
    for (int64_t i = 0; i < d; ++i) {
      grad_q[i] += w * (b[i] - cq * q[i]);
      gb[i] = w * (q[i] - cb * b[i]);
    }
  }
}

}  // namespace

// The backward of cosine_topk's scores (its indices have none): the gradient of every
// query and, summed over the queries that selected it, of every bank row.
std::tuple<at::Tensor, at::Tensor> cosine_topk_backward_cpu(const at::Tensor& grad_scores, const at::Tensor& queries,
                                                            const at::Tensor& bank, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(queries.dim() == 2 && bank.dim() == 2 && bank.size(1) == queries.size(1),
                    "queries, bank: expected (B, d) and (M, d)");
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == queries.size(0) && indices.scalar_type() == at::kLong,
                    "indices: expected (B, k) int64");
  TORCH_CHECK_VALUE(grad_scores.sizes() == indices.sizes(), "grad_scores: expected the shape of indices (B, k)");
  const int64_t B = queries.size(0), d = queries.size(1), k = indices.size(1);
  const auto dtype = (queries.scalar_type() == at::kDouble || bank.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const at::Tensor q = queries.to(dtype).contiguous(), g = grad_scores.to(dtype).contiguous();
  const at::Tensor flat = indices.reshape({-1});
  const at::Tensor rows = bank.index_select(0, flat).to(dtype).contiguous();  // (B*k, d) selected rows
  at::Tensor grad_q = at::empty({B, d}, q.options()), grad_rows = at::empty({B * k, d}, q.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "cosine_topk_backward_cpu", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *rp = rows.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    scalar_t *gq = grad_q.data_ptr<scalar_t>(), *gr = grad_rows.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      query_backward(qp + b * d, rp + b * k * d, gp + b * k, k, d, gq + b * d, gr + b * k * d);
  });
  at::Tensor grad_bank = at::zeros({bank.size(0), d}, q.options()).index_add_(0, flat, grad_rows);
  return {grad_q.to(queries.scalar_type()), grad_bank.to(bank.scalar_type())};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// cosine_topk's autograd in C++: the adapter retrieves once per training step with
// inputs that need no gradient, and a Python-registered autograd wraps every call
// (gradient or not) in two Python round trips that cost more than a small bank's search.
class CosineTopkFunction : public torch::autograd::Function<CosineTopkFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                               int64_t n_valid) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::cosine_topk", "")
                               .typed<decltype(cosine_topk_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [scores, indices] = op.call(queries, bank, k, n_valid);
    ctx->save_for_backward({queries, bank, indices});
    ctx->mark_non_differentiable({indices});
    return {scores, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::cosine_topk_backward", "")
                               .typed<decltype(cosine_topk_backward_cpu)>();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_q, grad_bank] = op.call(grads[0], saved[0], saved[1], saved[2]);
    return {grad_q, grad_bank, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> cosine_topk_autograd(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                                        int64_t n_valid) {
  const variable_list out = CosineTopkFunction::apply(queries, bank, k, n_valid);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifm, Autograd, m) { m.impl("cosine_topk", &cosine_topk_autograd); }

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("cosine_topk", &cosine_topk_cpu);
  m.impl("cosine_topk_backward", &cosine_topk_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifm
