// Schema of omnifm::spalign_loss and its backward (semantics: omnifm/ops/spalign_loss.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  // sum over the batch of ||s_b - mean_j protos_bj||^2, divided by B: a 0-dim tensor.
  m.def("spalign_loss(Tensor s, Tensor protos) -> Tensor");
  // Gradients of grad * spalign_loss(s, protos) for s (B, d) and protos (B, k, d).
  m.def("spalign_loss_backward(Tensor grad, Tensor s, Tensor protos) -> (Tensor, Tensor)");
}
