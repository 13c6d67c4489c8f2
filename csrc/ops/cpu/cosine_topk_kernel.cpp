// CPU kernel: cosine top-k over a bank streamed in tiles. Each task takes a block of
// queries and a chunk of bank rows, multiplies one tile at a time into a small
// cache-resident buffer (BLAS), and keeps a running top-k heap per query; the (B, M)
// similarity matrix never exists. score = ((q . b) * rq) * rb with r = 1 / max(|v|, eps),
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
constexpr int64_t kQueryBlock = 256;
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

// 1 / max(|row|, eps) per row; the first non-finite row (or -1) goes to bad_row.
template <typename T>
at::Tensor inverse_norms(const at::Tensor& rows, int64_t offset, std::atomic<int64_t>& bad_row) {
  at::Tensor sq = (rows * rows).sum(1);
  const T* s = sq.data_ptr<T>();
  at::Tensor inv = at::empty_like(sq);
  T* out = inv.data_ptr<T>();
  for (int64_t i = 0; i < sq.size(0); ++i) {
    if (!std::isfinite(s[i])) {
      int64_t expected = -1;
      bad_row.compare_exchange_strong(expected, offset + i);
    }
    // In T, operation for operation as the reference: 1 / clamp_min(sqrt(sum sq), eps).
    out[i] = T(1) / std::max(std::sqrt(s[i]), static_cast<T>(kEps));
  }
  return inv;
}

template <typename T>
void topk_impl(const at::Tensor& q, const at::Tensor& bank, int64_t k, int64_t n_valid,
               at::Tensor& scores, at::Tensor& indices) {
  const int64_t B = q.size(0);
  const auto dtype = q.scalar_type();
  std::atomic<int64_t> bad_query(-1), bad_row(-1);
  const at::Tensor rq = inverse_norms<T>(q, 0, bad_query);
  TORCH_CHECK_VALUE(bad_query.load() < 0, "queries: row ", bad_query.load(), " is not finite");

  const int64_t n_qblocks = (B + kQueryBlock - 1) / kQueryBlock;
  const int64_t n_tiles = (n_valid + kTileRows - 1) / kTileRows;
  // Split the bank into chunks only when the query blocks alone cannot keep every
  // thread busy; each chunk's heaps are merged at the end.
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks = std::min(n_tiles, std::max<int64_t>(1, (threads + n_qblocks - 1) / n_qblocks));
  const int64_t tiles_per_chunk = (n_tiles + n_chunks - 1) / n_chunks;
  std::vector<std::vector<TopK<T>>> partial(n_qblocks * n_chunks);

  at::parallel_for(0, n_qblocks * n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task / n_chunks, chunk = task % n_chunks;
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(B, q0 + kQueryBlock);
      const at::Tensor qblock = q.slice(0, q0, q1);
      const T* rq_p = rq.data_ptr<T>() + q0;
      std::vector<TopK<T>> heaps(q1 - q0, TopK<T>(k));
      const int64_t r_begin = chunk * tiles_per_chunk * kTileRows;
      const int64_t r_end = std::min(n_valid, r_begin + tiles_per_chunk * kTileRows);
      for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileRows) {
        const int64_t r1 = std::min(r_end, r0 + kTileRows);
        const at::Tensor tile = bank.slice(0, r0, r1).to(dtype).contiguous();
        const at::Tensor rb = inverse_norms<T>(tile, r0, bad_row);
        const at::Tensor sim = at::mm(qblock, tile.t()).contiguous();
        const T* s = sim.data_ptr<T>();
        const T* rb_p = rb.data_ptr<T>();
        const int64_t T_rows = r1 - r0;
        for (int64_t i = 0; i < q1 - q0; ++i) {
          TopK<T>& h = heaps[i];
          T thr = h.threshold();
          const T* srow = s + i * T_rows;
          for (int64_t j = 0; j < T_rows; ++j) {
            const T score = (srow[j] * rq_p[i]) * rb_p[j];
            if (score > thr) {
              h.offer(score, r0 + j);
              thr = h.threshold();
            }
          }
        }
      }
      partial[task] = std::move(heaps);
    }
  });
  TORCH_CHECK_VALUE(bad_row.load() < 0, "bank: row ", bad_row.load(), " is not finite (or its norm overflows)");

  T* out_s = scores.data_ptr<T>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<Hit<T>> hits;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t qb = b / kQueryBlock, i = b % kQueryBlock;
      hits.clear();
      for (int64_t c = 0; c < n_chunks; ++c) {
        const auto& heap = partial[qb * n_chunks + c][i].heap;
        hits.insert(hits.end(), heap.begin(), heap.end());
      }
      std::partial_sort(hits.begin(), hits.begin() + k, hits.end(), before<T>);
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
