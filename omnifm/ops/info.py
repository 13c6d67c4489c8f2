"""backend_info(): which backend each op would use for CPU and CUDA tensors, and why
the others were skipped (shown by `omnifm info`)."""
import platform

import torch

from . import _backend, lowpass_spectrum, spectral_token

OPS = {"lowpass_spectrum": lowpass_spectrum.backend_checks, "spectral_token": spectral_token.backend_checks}


def _versions():
    import omnifm_ext

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    versions["cuda_available"] = torch.cuda.is_available()
    versions["omnifm_ext"] = omnifm_ext.build_info()
    return versions


def backend_info(dtype=torch.float32):
    """{"versions": {...}, "ops": {op: {device: {"backend": name | None, "skipped": {...}}}}}."""
    ops = {}
    for name, checks in OPS.items():
        ops[name] = {}
        for dev in ("cpu", "cuda"):
            try:
                choice = _backend.choose(checks(dev, dtype), dev)
                ops[name][dev] = {"backend": choice.backend, "skipped": choice.skipped}
            except _backend.BackendUnavailableError as exc:
                ops[name][dev] = {"backend": None, "skipped": {"error": str(exc)}}
    return {"versions": _versions(), "forced": _backend.forced_backend(), "ops": ops}
