// Schema of the fused core of omnifm::eca_attention (semantics:
// omnifm/ops/eca_attention.py): Z = softmax(r . at^T) vp with at = (Wq (protos Wk)^T / sqrt(dh))^T.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def("eca_core(Tensor r, Tensor at, Tensor vp) -> Tensor");
  m.def("eca_core_backward(Tensor grad, Tensor r, Tensor at, Tensor vp) -> (Tensor, Tensor, Tensor)");
  // y = x + ECA(x^T, protos, wq, wk, wv, value_bias)^T for channel-first tokens x (B, d, L).
  m.def("eca_residual(Tensor x, Tensor protos, Tensor wq, Tensor wk, Tensor wv, Tensor? value_bias) -> Tensor");
  m.def(
      "eca_residual_backward(Tensor grad, Tensor x, Tensor protos, Tensor wq, Tensor wk, Tensor wv, "
      "Tensor? value_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // [ECA(r, protos, wq, wk, wv) out_weight^T | r | suffix] for tokens r (B, L, d): the
  // adapter's sequence mode with PSP (prefix Z, tokens, suffix prompts), (B, 2L + p, d).
  m.def("eca_psp(Tensor r, Tensor protos, Tensor wq, Tensor wk, Tensor wv, Tensor out_weight, Tensor suffix) -> Tensor");
  m.def(
      "eca_psp_backward(Tensor grad, Tensor r, Tensor protos, Tensor wq, Tensor wk, Tensor wv, Tensor out_weight, "
      "Tensor suffix) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
