// Schema of the fused core of omnifm::eca_attention (semantics:
// omnifm/ops/eca_attention.py): Z = softmax(r . at^T) vp with at = (Wq (protos Wk)^T / sqrt(dh))^T.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def("eca_core(Tensor r, Tensor at, Tensor vp) -> Tensor");
  m.def("eca_core_backward(Tensor grad, Tensor r, Tensor at, Tensor vp) -> (Tensor, Tensor, Tensor)");
}
