// Input checks shared by the CPU kernels. The Python wrappers validate first with
// messages naming the argument; these keep direct torch.ops calls safe too.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <string>

namespace omnifm {
namespace cpu {

inline void check_image(const at::Tensor& x, int64_t size) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a (B, C, H, W) tensor, got ", x.dim(), " dims");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x: the CPU kernel takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor");
  TORCH_CHECK_VALUE(size >= 1 && size <= std::min(x.size(2), x.size(3)),
                    "size: must be in [1, min(H, W)] = [1, ", std::min(x.size(2), x.size(3)),
                    "], got ", size);
}

inline void check_param(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                        const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device());
}

// Output buffer. With OMNIFM_POISON_OUTPUTS=1 (set by the tests) it starts as NaN,
// so an element the kernel forgets to write cannot pass as a plausible value.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  static const bool poison = [] {
    const char* v = std::getenv("OMNIFM_POISON_OUTPUTS");
    return v != nullptr && std::string(v) == "1";
  }();
  return poison ? at::full(shape, std::numeric_limits<double>::quiet_NaN(), opts) : at::empty(shape, opts);
}

}  // namespace cpu
}  // namespace omnifm
