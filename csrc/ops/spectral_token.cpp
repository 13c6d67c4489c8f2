// Schema of omnifm::spectral_token and its CPU backward (semantics:
// omnifm/ops/spectral_token.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def(
      "spectral_token(Tensor x, Tensor mix_weight, Tensor freq_embed, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, int size) -> Tensor");
  // spectral_token for a training step: (tokens, kept), kept what the backward reads
  // instead of recomputing (float32; an empty tensor in float64).
  m.def(
      "spectral_token_saving(Tensor x, Tensor mix_weight, Tensor freq_embed, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, int size) -> (Tensor, Tensor)");
  // Returns the gradients of (mix_weight, freq_embed, w1, b1, w2, b2) and, with
  // grad_bins, of the log-magnitude window (B, C, K, K) (else an empty tensor); kept:
  // spectral_token_saving's second output, or None (or empty) to recompute.
  m.def(
      "spectral_token_backward(Tensor grad, Tensor x, Tensor mix_weight, Tensor freq_embed, Tensor w1, "
      "Tensor b1, Tensor w2, Tensor b2, int size, bool grad_bins, Tensor? kept=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
