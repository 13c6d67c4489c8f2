// Schema of omnifm::lowpass_spectrum (semantics: omnifm/ops/lowpass_spectrum.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(omnifm, m) {
  m.def("lowpass_spectrum(Tensor x, int size, bool log=False) -> Tensor");
}
