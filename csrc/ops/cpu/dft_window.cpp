#include "dft_window.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace omnifm {
namespace cpu {
namespace {

// cos/-sin of 2*pi*f*n/N for f in freqs, n in [0, N), scaled by 1/N. Computed in
// double with the phase reduced modulo N first, so large N keeps full accuracy.
void fill_basis(std::vector<double>& cos_out, std::vector<double>& sin_out,
                const std::vector<int64_t>& freqs, int64_t N) {
  const double two_pi = 6.283185307179586476925286766559;
  cos_out.resize(freqs.size() * N);
  sin_out.resize(freqs.size() * N);
  for (size_t i = 0; i < freqs.size(); ++i) {
    const int64_t f = ((freqs[i] % N) + N) % N;
    for (int64_t n = 0; n < N; ++n) {
      const double phase = two_pi * static_cast<double>((f * n) % N) / static_cast<double>(N);
      cos_out[i * N + n] = std::cos(phase) / static_cast<double>(N);
      sin_out[i * N + n] = -std::sin(phase) / static_cast<double>(N);
    }
  }
}

}  // namespace

HalfWindowBases half_window_bases(int64_t H, int64_t W, int64_t K, at::ScalarType dtype) {
  const int64_t half = K / 2;
  std::vector<int64_t> row_freqs, col_freqs;
  for (int64_t u = -half; u <= half; ++u) row_freqs.push_back(u);
  for (int64_t v = 0; v <= half; ++v) col_freqs.push_back(v);
  const int64_t nr = static_cast<int64_t>(row_freqs.size());
  const int64_t nc = static_cast<int64_t>(col_freqs.size());

  std::vector<double> rc, rs, cc, cs;
  fill_basis(rc, rs, row_freqs, H);
  fill_basis(cc, cs, col_freqs, W);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor rows = at::empty({2 * nr, H}, opts);
  std::copy(rc.begin(), rc.end(), rows.data_ptr<double>());
  std::copy(rs.begin(), rs.end(), rows.data_ptr<double>() + nr * H);
  // cols is (W, 2*nc): transpose of the (2*nc, W) basis.
  at::Tensor cols_t = at::empty({2 * nc, W}, opts);
  std::copy(cc.begin(), cc.end(), cols_t.data_ptr<double>());
  std::copy(cs.begin(), cs.end(), cols_t.data_ptr<double>() + nc * W);
  return {rows.to(dtype), cols_t.t().contiguous().to(dtype), nr, nc};
}

int64_t samples_per_task(int64_t B, int64_t bytes_per_sample) {
  const int64_t by_cache = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, bytes_per_sample));
  const int64_t by_threads = std::max<int64_t>(1, B / (2 * at::get_num_threads()));
  return std::max<int64_t>(1, std::min(by_cache, by_threads));
}

at::Tensor window_magnitude(const at::Tensor& planes, const HalfWindowBases& b, int64_t K) {
  const int64_t C = planes.size(0), H = planes.size(1), W = planes.size(2);
  const int64_t nr = b.nr, nc = b.nc, half = K / 2;
  // Stage 1 reads the planes once: (C*H, W) @ (W, 2*nc).
  at::Tensor y = at::mm(planes.reshape({C * H, W}), b.cols).view({C, H, 2 * nc});
  // Stage 2: (2*nr, H) @ (H, 2*nc) per plane.
  at::Tensor z = at::matmul(b.rows, y);
  using at::indexing::Slice;
  at::Tensor ch_p = z.index({Slice(), Slice(0, nr), Slice(0, nc)});
  at::Tensor ch_q = z.index({Slice(), Slice(0, nr), Slice(nc, 2 * nc)});
  at::Tensor sh_p = z.index({Slice(), Slice(nr, 2 * nr), Slice(0, nc)});
  at::Tensor sh_q = z.index({Slice(), Slice(nr, 2 * nr), Slice(nc, 2 * nc)});
  at::Tensor re = ch_p - sh_q;
  at::Tensor im = ch_q + sh_p;
  at::Tensor mag = at::sqrt(re * re + im * im);  // (C, nr, nc); row index = u + half
  // Window column j has v = j - half. v >= 0: row u + half, column v.
  at::Tensor right = mag.index({Slice(), Slice(0, K), Slice(0, K - half)});
  if (half == 0) return right.contiguous();
  // v < 0: mirror (u, v) -> (-u, -v): rows 2*half - i, columns half - j, both reversed.
  at::Tensor left = mag.index({Slice(), Slice(2 * half - K + 1, 2 * half + 1), Slice(1, half + 1)})
                        .flip({1, 2});
  return at::cat({left, right}, 2);
}

}  // namespace cpu
}  // namespace omnifm
