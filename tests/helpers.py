"""Shared test helpers: relative error, tolerances, backends to test, forcing one."""
import contextlib
import os

import torch

from omnifm.ops import _backend

# Error floor per dtype on top of "at most ~3x PyTorch's own error in that precision".
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def relerr(out, ref):
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails any bound)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    assert denom > 0, "never compare on zeros"
    return ((out - ref).norm() / denom).item()


def assert_close_to_ref(out, ref64, ref_same_dtype, dtype, what=""):
    """The fast path's error vs the float64 reference is at most ~3x the error of the
    PyTorch reference run in the same dtype, plus a small floor."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    bound = 3 * relerr(ref_same_dtype, ref64) + FLOOR[dtype]
    err = relerr(out, ref64)
    assert err <= bound, f"{what}: relative error {err:.3e} > bound {bound:.3e}"


def fast_backends(op):
    """[(backend, device)] of the fast paths this machine can run for op."""
    out = []
    if _backend.ext_status(op, "cpu") is None:
        out.append(("ext", "cpu"))
    if torch.cuda.is_available() and _backend.triton_status("cuda") is None:
        out.append(("triton", "cuda"))
    elif _backend.triton_status("cpu") is None:
        out.append(("triton", "cpu"))
    return out


@contextlib.contextmanager
def forced(backend):
    old = os.environ.get("OMNIFM_BACKEND")
    os.environ["OMNIFM_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMNIFM_BACKEND", None)
        else:
            os.environ["OMNIFM_BACKEND"] = old
