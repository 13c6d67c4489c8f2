// Schema of omnifm::spectral_token (semantics: omnifm/ops/spectral_token.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def(
      "spectral_token(Tensor x, Tensor mix_weight, Tensor freq_embed, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, int size) -> Tensor");
}
