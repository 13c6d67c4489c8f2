// Python module omnifm_ext._C: loading it registers the ops above with the
// dispatcher; pybind11 carries only the build metadata.
#include <torch/extension.h>

#ifndef OMNIFM_VERSION
#define OMNIFM_VERSION "unknown"
#endif
#ifndef OMNIFM_TORCH_VERSION
#define OMNIFM_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "omnifm compiled kernels";
  m.def("build_info", []() {
    pybind11::dict info;
    info["version"] = OMNIFM_VERSION;
    info["torch_built_against"] = OMNIFM_TORCH_VERSION;
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#else
    info["compiler"] = "unknown";
#endif
#ifdef OMNIFM_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cpu_ops"] = std::vector<std::string>{"lowpass_spectrum", "spectral_token", "cosine_topk", "eca_core",
                                               "eca_residual", "eca_psp", "spalign_loss"};
    return info;
  });
}
