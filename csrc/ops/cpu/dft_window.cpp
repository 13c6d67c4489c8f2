#include "dft_window.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
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

HalfWindowBases make_half_window_bases(int64_t H, int64_t W, int64_t K, at::ScalarType dtype) {
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

}  // namespace

HalfWindowBases half_window_bases(int64_t H, int64_t W, int64_t K, at::ScalarType dtype) {
  // The bases cost ~1,000 sin/cos per call, more than a small batch's DFT; a training
  // run uses one or two shapes, so up to 16 are kept. The map is never destroyed, so
  // no tensor destructor runs at exit after libtorch's own statics. Callers only read
  // the bases, so sharing them across calls and threads is safe.
  using Key = std::tuple<int64_t, int64_t, int64_t, at::ScalarType>;
  static std::mutex mutex;
  static auto* cache = new std::map<Key, HalfWindowBases>();
  const Key key{H, W, K, dtype};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  if (cache->size() >= 16) cache->clear();
  return cache->emplace(key, make_half_window_bases(H, W, K, dtype)).first->second;
}

int64_t samples_per_task(int64_t B, int64_t bytes_per_sample) {
  // OMNIFM_CPU_CHUNK_SAMPLES=n (tests) sets the chunk, so small batches cross chunks.
  if (const char* forced = std::getenv("OMNIFM_CPU_CHUNK_SAMPLES")) {
    const int64_t n = std::atoll(forced);
    if (n >= 1) return std::min(std::max<int64_t>(1, B), n);
  }
  const int64_t by_cache = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, bytes_per_sample));
  return std::min(std::max<int64_t>(1, B), by_cache);
}

at::Tensor window_parts(const at::Tensor& planes, const HalfWindowBases& b) {
  const int64_t N = planes.size(0), H = planes.size(1), W = planes.size(2);
  // Stage 1 reads the planes once: (N*H, W) @ (W, 2*nc).
  at::Tensor y = at::mm(planes.reshape({N * H, W}), b.cols).view({N, H, 2 * b.nc});
  // Stage 2: (2*nr, H) @ (H, 2*nc) per plane.
  return at::matmul(b.rows, y).contiguous();
}

at::Tensor window_magnitude(const at::Tensor& planes, const HalfWindowBases& b, int64_t K) {
  const int64_t N = planes.size(0);
  const at::Tensor z = window_parts(planes, b);
  at::Tensor mag = at::empty({N, K, K}, planes.options());
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "window_magnitude", [&] {
    const WindowIndex<scalar_t> w{z.data_ptr<scalar_t>(), b.nr, b.nc, K};
    scalar_t* out = mag.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) *out++ = w.magnitude(n, i, j);
  });
  return mag;
}

}  // namespace cpu
}  // namespace omnifm
