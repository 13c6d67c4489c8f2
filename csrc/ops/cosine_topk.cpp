// Schema of omnifm::cosine_topk (semantics: omnifm/ops/cosine_topk.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def("cosine_topk(Tensor queries, Tensor bank, int k, int n_valid) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def(
      "cosine_topk_screened(Tensor queries, Tensor bank, Tensor query_unit, Tensor query_inv_norms, "
      "Tensor bank_unit, Tensor bank_inv_norms, int k, int n_valid, float bound) -> (Tensor, Tensor)");
}
