// CPU kernel: cosine top-k over a bank streamed in tiles of kTileRows rows. Each tile
// is multiplied against a block of queries into a reused buffer (BLAS), and every
// query keeps a running top-k heap; the (B, M) similarity matrix never exists. score = ((q . b) * rq) * rb with r = 1 / max(|v|, eps),
// the same expression as the reference, so exact ties (duplicated rows) stay ties and
// are broken by the lower index.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"

namespace omnifm {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 1024;
constexpr int64_t kQueryBlock = 4096;  // bounds the similarity buffer: 16 MiB in float32
constexpr double kEps = 1e-12;

template <typename T>
struct Hit {
  T score;
  int64_t index;
};

// a ranks before b: higher score, then lower index.
template <typename T>
inline bool before(const Hit<T>& a, const Hit<T>& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// Min-heap on rank (the worst kept hit on top), capacity k.
template <typename T>
struct TopK {
  std::vector<Hit<T>> heap;
  int64_t k;
  explicit TopK(int64_t k_) : k(k_) { heap.reserve(k_); }
  inline T threshold() const {
    return static_cast<int64_t>(heap.size()) < k ? -std::numeric_limits<T>::infinity() : heap.front().score;
  }
  // Called in increasing index order within a chunk, so an equal score never wins.
  inline void offer(T score, int64_t index) {
    auto worse_first = [](const Hit<T>& a, const Hit<T>& b) { return before(a, b); };
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back({score, index});
      std::push_heap(heap.begin(), heap.end(), worse_first);
    } else if (score > heap.front().score) {
      std::pop_heap(heap.begin(), heap.end(), worse_first);
      heap.back() = {score, index};
      std::push_heap(heap.begin(), heap.end(), worse_first);
    }
  }
};

// 1 / max(|row|, eps) for each row of a contiguous (n, d) block, written to out, in T
// operation for operation as the reference: 1 / clamp_min(sqrt(sum sq), eps). The first
// non-finite row (global index offset + i) goes to bad_row. No allocation: this runs
// per tile inside the parallel region.
template <typename T>
void inverse_norms(const T* rows, int64_t n, int64_t d, int64_t offset, T* out, std::atomic<int64_t>& bad_row) {
  for (int64_t i = 0; i < n; ++i) {
    const T* r = rows + i * d;
    T sq = 0;
    for (int64_t j = 0; j < d; ++j) sq += r[j] * r[j];
    if (!std::isfinite(sq)) {
      int64_t expected = -1;
      bad_row.compare_exchange_strong(expected, offset + i);
    }
    out[i] = T(1) / std::max(std::sqrt(sq), static_cast<T>(kEps));
  }
}

template <typename T>
void topk_impl(const at::Tensor& q, const at::Tensor& bank, int64_t k, int64_t n_valid,
               at::Tensor& scores, at::Tensor& indices) {
  const int64_t B = q.size(0), d = q.size(1);
  const auto dtype = q.scalar_type();
  std::atomic<int64_t> bad_query(-1), bad_row(-1);
  std::vector<T> rq(B), rb(kTileRows);
  inverse_norms<T>(q.data_ptr<T>(), B, d, 0, rq.data(), bad_query);
  TORCH_CHECK_VALUE(bad_query.load() < 0, "queries: row ", bad_query.load(), " is not finite");

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
    inverse_norms<T>(tile.data_ptr<T>(), rows, d, r0, rb.data(), bad_row);
    const T* rb_p = rb.data();
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
  TORCH_CHECK_VALUE(bad_row.load() < 0, "bank: row ", bad_row.load(), " is not finite (or its norm overflows)");

  T* out_s = scores.data_ptr<T>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      std::vector<Hit<T>>& hits = heaps[b].heap;
      std::sort(hits.begin(), hits.end(), before<T>);
      for (int64_t j = 0; j < k; ++j) {
        out_s[b * k + j] = hits[j].score;
        out_i[b * k + j] = hits[j].index;
      }
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

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("cosine_topk", &cosine_topk_cpu);
}

}  // namespace cpu
}  // namespace omnifm
