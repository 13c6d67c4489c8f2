// CPU kernel: exact cosine top-k, with the bank screened in bfloat16 first.
//
// The float32 kernel is bound by its float32 GEMM. Here the GEMM runs on bfloat16
// copies of the unit-normalised queries and bank (AMX / AVX512-BF16 through oneDNN
// where the CPU has them: several times the float32 rate), giving an approximate
// cosine a_j for every row, with a proven bound |a_j - s_j| <= E on its distance from
// the exact score s_j (omnifm/ops/cosine_topk.py derives E). A row is rescored exactly
// only if it could still enter the top k:
//
//     a_j >= t,   t = s_k - E   (rounded down),
//
// where s_k is the k-th best exact score among the rows rescored so far. Why nothing
// is lost: s_k only grows, so a row skipped when the threshold was t has
// s_j <= a_j + E < s_k(then) <= s_k(final): k rescored rows rank strictly above it,
// and it is not in the top k. So every row of the top k is rescored, and the answer is
// the top k of the rescored rows by the exact score. Before k rows are rescored (the
// first tile), see first_threshold.
//
// The exact score is the reference's: dot in float32 accumulated in index order with
// fused multiply-adds (what the BLAS GEMM of the reference does per output: checked
// bit for bit by the tests), then ((dot * rq) * rb) with the reference's inverse norms,
// passed in. Ties go to the lower index because rows are rescored in index order.
//
// The hot loops (the screen over a tile of approximate scores, the rescoring) are
// compiled for several x86 instruction sets and picked at load time (target_clones:
// an ifunc), never with -march=native.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "check.h"
#include "topk_heap.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OMNIFM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OMNIFM_MULTIVERSION
#endif

namespace omnifm {
namespace cpu {
namespace {

// Tiles of 4096 rows x 1024 queries (an 8 MiB bfloat16 score buffer): oneDNN's
// per-call cost makes smaller tiles slower (bench/bench_topk.py at M=200k, d=128).
constexpr int64_t kTileRows = 4096;
constexpr int64_t kQueryBlock = 1024;
constexpr int64_t kScreenBlock = 128;  // one horizontal reduction per 128 scores
constexpr int64_t kFirstSample = 512;  // rows of the first tile that set its threshold
constexpr int64_t kRescoreWidth = 8;  // rows rescored together: 8 independent FMA chains

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Positions j in [0, n) with bf16 score s[j] >= t, in increasing order, written to out;
// returns how many. Blocks without one cost one vectorised compare.
OMNIFM_MULTIVERSION
int64_t screen(const uint16_t* s, int64_t n, float t, int32_t* out) {
  int64_t m = 0, j0 = 0;
  for (; j0 + kScreenBlock <= n; j0 += kScreenBlock) {
    int hit = 0;
    for (int64_t jj = 0; jj < kScreenBlock; ++jj) hit |= bf16_to_float(s[j0 + jj]) >= t;
    if (!hit) continue;
    for (int64_t jj = 0; jj < kScreenBlock; ++jj) {
      if (bf16_to_float(s[j0 + jj]) >= t) out[m++] = static_cast<int32_t>(j0 + jj);
    }
  }
  for (; j0 < n; ++j0) {
    if (bf16_to_float(s[j0]) >= t) out[m++] = static_cast<int32_t>(j0);
  }
  return m;
}

// The same for a threshold t > 0, on the raw bits: with tb the smallest bfloat16
// >= t, a score s is >= t iff s >= tb, and for tb > 0 that is int16 order of the bits
// (positive values order as their bits; negative ones, -0 included, are negative
// int16). Twice the scores per instruction of the float compare, no conversion.
template <int64_t N>
inline int16_t block_max(const int16_t* s) {
  int16_t mx = std::numeric_limits<int16_t>::min();
  for (int64_t j = 0; j < N; ++j) mx = std::max(mx, s[j]);
  return mx;
}

OMNIFM_MULTIVERSION
int64_t screen_positive(const int16_t* s, int64_t n, int16_t tb, int32_t* out) {
  // Blocks of 512 scores, then of 32: one vector max and one horizontal reduction per
  // block (a compare per element with an OR per 128 was twice as slow).
  int64_t m = 0, j0 = 0;
  for (; j0 + 512 <= n; j0 += 512) {
    if (block_max<512>(s + j0) < tb) continue;
    for (int64_t j1 = j0; j1 < j0 + 512; j1 += 32) {
      if (block_max<32>(s + j1) < tb) continue;
      for (int64_t j = j1; j < j1 + 32; ++j) {
        if (s[j] >= tb) out[m++] = static_cast<int32_t>(j);
      }
    }
  }
  for (; j0 < n; ++j0) {
    if (s[j0] >= tb) out[m++] = static_cast<int32_t>(j0);
  }
  return m;
}

// Bits of the smallest bfloat16 >= t, for finite t > 0 (0x7f80, +inf, if none).
inline int16_t bfloat16_bits_at_least(float t) {
  uint32_t u;
  std::memcpy(&u, &t, sizeof u);
  uint32_t hi = u >> 16;
  if ((u & 0xffffu) != 0) ++hi;  // round up: the carry into the exponent is right too
  return static_cast<int16_t>(std::min<uint32_t>(hi, 0x7f80u));
}

// Positions j with score >= t, by whichever screen applies.
inline int64_t screen_scores(const uint16_t* s, int64_t n, float t, int32_t* out) {
  if (t > 0.f) return screen_positive(reinterpret_cast<const int16_t*>(s), n, bfloat16_bits_at_least(t), out);
  return screen(s, n, t, out);
}

// dots[p] = qs[p] . rows[p], each accumulated in index order by fused multiply-adds.
// One dot is a chain of d dependent FMAs; running 8 pairs side by side hides the
// latency, so candidates are rescored in batches across queries.
OMNIFM_MULTIVERSION
void exact_dots(const float* const* qs, const float* const* rows, int64_t n, int64_t d, float* dots) {
  int64_t p0 = 0;
  for (; p0 + kRescoreWidth <= n; p0 += kRescoreWidth) {
    float acc[kRescoreWidth] = {};
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t p = 0; p < kRescoreWidth; ++p) acc[p] = std::fma(qs[p0 + p][i], rows[p0 + p][i], acc[p]);
    }
    for (int64_t p = 0; p < kRescoreWidth; ++p) dots[p0 + p] = acc[p];
  }
  for (; p0 < n; ++p0) {
    float acc = 0.f;
    for (int64_t i = 0; i < d; ++i) acc = std::fma(qs[p0][i], rows[p0][i], acc);
    dots[p0] = acc;
  }
}

// The largest float <= x (x - E computed in double, exact for these magnitudes).
inline float float_at_most(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) > x) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// The screen's threshold while fewer than k rows are rescored (the first tile): with
// a_k the need-th largest approximate score among the tile's first rows (any subset
// will do), need rows have s >= a_k - E, so the final k-th best is >= a_k - E and a
// row with a_j < a_k - 2E cannot enter.
float first_threshold(const uint16_t* s, int64_t n, int64_t need, double bound, std::vector<float>& buf) {
  n = std::min(n, std::max(need, kFirstSample));
  if (need > n) return -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) buf[j] = bf16_to_float(s[j]);
  std::nth_element(buf.begin(), buf.begin() + (need - 1), buf.begin() + n, std::greater<float>());
  return float_at_most(static_cast<double>(buf[need - 1]) - 2 * bound);
}

void check_args(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& query_unit,
                const at::Tensor& query_inv_norms, const at::Tensor& bank_unit,
                const at::Tensor& bank_inv_norms, int64_t k, int64_t n_valid, double bound) {
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries: expected (B, d), got ", queries.dim(), " dims");
  TORCH_CHECK_VALUE(bank.dim() == 2 && bank.size(1) == queries.size(1), "bank: expected (M, d=", queries.size(1), ")");
  TORCH_CHECK_TYPE(queries.scalar_type() == at::kFloat && bank.scalar_type() == at::kFloat,
                   "queries, bank: the screened kernel takes float32");
  TORCH_CHECK_VALUE(n_valid >= 1 && n_valid <= bank.size(0), "n_valid: must be in [1, ", bank.size(0), "], got ", n_valid);
  TORCH_CHECK_VALUE(k >= 1 && k <= n_valid, "k: must be in [1, n_valid=", n_valid, "], got ", k);
  TORCH_CHECK_VALUE(query_unit.sizes() == queries.sizes() && query_unit.scalar_type() == at::kBFloat16,
                    "query_unit: expected bfloat16 of the queries' shape");
  TORCH_CHECK_VALUE(bank_unit.dim() == 2 && bank_unit.size(0) == n_valid && bank_unit.size(1) == queries.size(1) &&
                        bank_unit.scalar_type() == at::kBFloat16,
                    "bank_unit: expected bfloat16 (n_valid, d)");
  TORCH_CHECK_VALUE(query_inv_norms.dim() == 1 && query_inv_norms.size(0) == queries.size(0) &&
                        query_inv_norms.scalar_type() == at::kFloat,
                    "query_inv_norms: expected float32 (B,)");
  TORCH_CHECK_VALUE(bank_inv_norms.dim() == 1 && bank_inv_norms.size(0) == n_valid &&
                        bank_inv_norms.scalar_type() == at::kFloat,
                    "bank_inv_norms: expected float32 (n_valid,)");
  TORCH_CHECK_VALUE(std::isfinite(bound) && bound >= 0, "bound: expected a finite value >= 0, got ", bound);
  for (const at::Tensor* t : {&queries, &bank, &query_unit, &query_inv_norms, &bank_unit, &bank_inv_norms}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "cosine_topk_screened: expected CPU tensors");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cosine_topk_screened_cpu(
    const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& query_unit,
    const at::Tensor& query_inv_norms, const at::Tensor& bank_unit, const at::Tensor& bank_inv_norms,
    int64_t k, int64_t n_valid, double bound) {
  check_args(queries, bank, query_unit, query_inv_norms, bank_unit, bank_inv_norms, k, n_valid, bound);
  const at::Tensor q = queries.contiguous(), b = bank.contiguous();
  const at::Tensor qu = query_unit.contiguous(), bu = bank_unit.contiguous();
  const at::Tensor rq_t = query_inv_norms.contiguous(), rb_t = bank_inv_norms.contiguous();
  const int64_t B = q.size(0), d = q.size(1);
  at::Tensor scores = new_output({B, k}, q.options());
  at::Tensor indices = at::full({B, k}, -1, q.options().dtype(at::kLong));
  if (B == 0) return {scores, indices};

  const float* qp = q.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float* rq = rq_t.data_ptr<float>();
  const float* rb = rb_t.data_ptr<float>();
  std::vector<TopK<float>> heaps(B, TopK<float>(k));
  const int64_t qblock = std::min(B, kQueryBlock);
  at::Tensor approx_buf = at::empty({qblock, kTileRows}, qu.options());

  for (int64_t r0 = 0; r0 < n_valid; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n_valid - r0);
    const at::Tensor tile = bu.slice(0, r0, r0 + rows);
    for (int64_t q0 = 0; q0 < B; q0 += qblock) {
      const int64_t nq = std::min(qblock, B - q0);
      at::Tensor approx = approx_buf.narrow(0, 0, nq).narrow(1, 0, rows);
      at::mm_out(approx, qu.slice(0, q0, q0 + nq), tile.t());
      const uint16_t* a = reinterpret_cast<const uint16_t*>(approx.data_ptr<at::BFloat16>());
      const int64_t ld = approx.stride(0);
      at::parallel_for(0, nq, 8, [&](int64_t begin, int64_t end) {
        std::vector<int32_t> hits(rows);
        std::vector<float> approx_row(rows);
        std::vector<int64_t> pair_query, pair_row;  // candidates of this chunk, in order
        std::vector<const float*> pair_q, pair_b;
        std::vector<float> dots;
        auto rescore = [&]() {
          const int64_t n = static_cast<int64_t>(pair_row.size());
          dots.resize(n);
          exact_dots(pair_q.data(), pair_b.data(), n, d, dots.data());
          for (int64_t p = 0; p < n; ++p) {
            const int64_t qi = pair_query[p], row = pair_row[p];
            heaps[qi].offer((dots[p] * rq[qi]) * rb[row], row);
          }
          pair_query.clear(), pair_row.clear(), pair_q.clear(), pair_b.clear();
        };
        for (int64_t i = begin; i < end; ++i) {
          const TopK<float>& h = heaps[q0 + i];
          const float t = h.full() ? float_at_most(static_cast<double>(h.threshold()) - bound)
                                   : first_threshold(a + i * ld, rows, k - static_cast<int64_t>(h.heap.size()),
                                                     bound, approx_row);
          const int64_t m = screen_scores(a + i * ld, rows, t, hits.data());
          for (int64_t c = 0; c < m; ++c) {
            pair_query.push_back(q0 + i);
            pair_row.push_back(r0 + hits[c]);
            pair_q.push_back(qp + (q0 + i) * d);
            pair_b.push_back(bp + (r0 + hits[c]) * d);
          }
          if (static_cast<int64_t>(pair_row.size()) >= kTileRows) rescore();
        }
        rescore();
      });
    }
  }

  float* out_s = scores.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) heaps[i].write_sorted(out_s + i * k, out_i + i * k);
  });
  return {scores, indices};
}

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("cosine_topk_screened", &cosine_topk_screened_cpu);
}

}  // namespace cpu
}  // namespace omnifm
