// Schema of omnifm::cosine_topk (semantics: omnifm/ops/cosine_topk.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def("cosine_topk(Tensor queries, Tensor bank, int k, int n_valid) -> (Tensor, Tensor)");
}
