"""Python side of the compiled extension: loads ``_C`` (which registers the CPU
kernels under ``torch.ops.omnifm``) and reports how it was built.

Importing this never raises: if the extension is missing or broken, ``AVAILABLE`` is
False and ``LOAD_ERROR`` says why, so omnifm falls back to the reference ops.
"""
import torch  # noqa: F401  (libtorch must be loaded before _C)

try:
    from . import _C  # noqa: F401
    AVAILABLE = True
    LOAD_ERROR = None
except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
    _C = None
    AVAILABLE = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def build_info():
    """Build metadata of the extension, or the reason it is not available."""
    if not AVAILABLE:
        return {"available": False, "error": LOAD_ERROR}
    return {"available": True, **dict(_C.build_info())}
