// Schema of omnifm::cosine_topk (semantics: omnifm/ops/cosine_topk.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def("cosine_topk(Tensor queries, Tensor bank, int k, int n_valid) -> (Tensor, Tensor)");
  // Gradients of sum(grad_scores * scores) for queries and bank, given the selected indices.
  m.def("cosine_topk_backward(Tensor grad_scores, Tensor queries, Tensor bank, Tensor indices) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def(
      "cosine_topk_screened(Tensor queries, Tensor bank, Tensor query_unit, Tensor query_inv_norms, "
      "Tensor bank_unit, Tensor bank_inv_norms, int k, int n_valid, float bound) -> (Tensor, Tensor)");
}
