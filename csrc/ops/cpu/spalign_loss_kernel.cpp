// CPU kernels of the SPAlign loss, sum_b ||s_b - mean_j protos_bj||^2 / B, and of its
// backward, each one pass over s (B, d) and protos (B, k, d), with the autograd in C++.
// The arithmetic is a few thousand multiply-adds; what the op saves is calls: inside a
// training step the PyTorch form (mean, mse_loss, a division, and their three backward
// nodes) finds each of those kernels cold, ~10-50 us apiece, more than the whole loss.
#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "check.h"

namespace omnifm {
namespace cpu {
namespace {

void check_spalign(const at::Tensor& s, const at::Tensor& protos) {
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) >= 1, "s: expected (B >= 1, d)");
  TORCH_CHECK_VALUE(protos.dim() == 3 && protos.size(0) == s.size(0) && protos.size(1) >= 1 &&
                        protos.size(2) == s.size(1),
                    "protos: expected (B, k >= 1, d) matching s");
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
                   "s: the CPU kernel takes float32 or float64, got ", s.scalar_type());
  TORCH_CHECK_TYPE(protos.scalar_type() == s.scalar_type(), "protos: expected the dtype of s");
}

// diff (d) = s_b - mean_j protos_bj for one sample: the prototypes summed in order, then
// divided by k, as protos.mean(1) does.
template <typename T>
void sample_diff(const T* s, const T* protos, int64_t k, int64_t d, T* diff) {
  for (int64_t i = 0; i < d; ++i) diff[i] = protos[i];
  for (int64_t j = 1; j < k; ++j)
    for (int64_t i = 0; i < d; ++i) diff[i] += protos[j * d + i];
  for (int64_t i = 0; i < d; ++i) diff[i] = s[i] - diff[i] / static_cast<T>(k);
}

}  // namespace

at::Tensor spalign_loss_cpu(const at::Tensor& s_in, const at::Tensor& protos_in) {
  check_spalign(s_in, protos_in);
  const at::Tensor s = s_in.contiguous(), protos = protos_in.contiguous();
  const int64_t B = s.size(0), d = s.size(1), k = protos.size(1);
  at::Tensor out = new_output({}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "spalign_loss_cpu", [&] {
    const scalar_t *sp = s.data_ptr<scalar_t>(), *pp = protos.data_ptr<scalar_t>();
    std::vector<scalar_t> diff(d);
    double total = 0;  // float32 squares summed in double: the sum of B * d terms keeps its bits
    for (int64_t b = 0; b < B; ++b) {
      sample_diff(sp + b * d, pp + b * k * d, k, d, diff.data());
      for (int64_t i = 0; i < d; ++i) total += static_cast<double>(diff[i]) * diff[i];
    }
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(total / static_cast<double>(B));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> spalign_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& s_in,
                                                             const at::Tensor& protos_in) {
  check_spalign(s_in, protos_in);
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad: expected one element (the loss is a scalar)");
  const at::Tensor s = s_in.contiguous(), protos = protos_in.contiguous();
  const int64_t B = s.size(0), d = s.size(1), k = protos.size(1);
  at::Tensor g_s = new_output({B, d}, s.options()), g_protos = new_output({B, k, d}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "spalign_loss_backward_cpu", [&] {
    const scalar_t *sp = s.data_ptr<scalar_t>(), *pp = protos.data_ptr<scalar_t>();
    scalar_t *gs = g_s.data_ptr<scalar_t>(), *gp = g_protos.data_ptr<scalar_t>();
    // d/ds_b = 2 (s_b - mean) / B; each prototype gets minus that, divided by k.
    const scalar_t scale = static_cast<scalar_t>(2 * grad.item<double>() / static_cast<double>(B));
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* row = gs + b * d;
      sample_diff(sp + b * d, pp + b * k * d, k, d, row);
      for (int64_t i = 0; i < d; ++i) row[i] *= scale;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t i = 0; i < d; ++i) gp[(b * k + j) * d + i] = -row[i] / static_cast<scalar_t>(k);
    }
  });
  return {g_s, g_protos};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One autograd node for the loss (the PyTorch form records three); both directions go
// through the dispatcher, so fake tensors (torch.compile) reach the registered fakes.
class SpalignLossFunction : public torch::autograd::Function<SpalignLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& protos) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::spalign_loss", "")
                               .typed<decltype(spalign_loss_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({s, protos});
    return op.call(s, protos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("omnifm::spalign_loss_backward", "")
                               .typed<decltype(spalign_loss_backward_cpu)>();
    const variable_list saved = ctx->get_saved_variables();
    auto [g_s, g_protos] = op.call(grads[0], saved[0], saved[1]);
    return {g_s, g_protos};
  }
};

at::Tensor spalign_loss_autograd(const at::Tensor& s, const at::Tensor& protos) {
  return SpalignLossFunction::apply(s, protos);
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifm, Autograd, m) { m.impl("spalign_loss", &spalign_loss_autograd); }

TORCH_LIBRARY_IMPL(omnifm, CPU, m) {
  m.impl("spalign_loss", &spalign_loss_cpu);
  m.impl("spalign_loss_backward", &spalign_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifm
