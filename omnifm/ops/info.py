"""backend_info(): which backend each op would use for CPU and CUDA tensors, and why
the others were skipped (shown by `omnifm info`)."""
import platform

import torch

from . import _backend
from .cosine_topk import backend_checks as _cosine_topk_checks
from .eca_attention import backend_checks as _eca_attention_checks
from .lowpass_spectrum import backend_checks as _lowpass_spectrum_checks
from .spectral_token import backend_checks as _spectral_token_checks

OPS = {
    "lowpass_spectrum": _lowpass_spectrum_checks,
    "spectral_token": _spectral_token_checks,
    "cosine_topk": _cosine_topk_checks,
    "eca_attention": _eca_attention_checks,
}


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


def _notes():
    """{op: a line on a choice made inside a backend}."""
    from . import _backend
    from .cosine_topk import SCREEN_MIN_QUERIES, SCREEN_MIN_ROWS, cpu_has_fast_bfloat16

    if not _backend.has_ext_kernel("cosine_topk_screened", "cpu"):
        screen = "off (omnifm_ext has no screened kernel)"
    elif not cpu_has_fast_bfloat16():
        screen = "off (this CPU has no bfloat16 instructions: the float32 GEMM path runs)"
    else:
        screen = (f"on for float32 calls from B >= {SCREEN_MIN_QUERIES[False]} queries and "
                  f"{SCREEN_MIN_ROWS[False]} rows (B >= {SCREEN_MIN_QUERIES[True]}, "
                  f"{SCREEN_MIN_ROWS[True]} rows with prepare_bank)")
    residual = ("cpu -> ext, one compiled call each way" if _backend.has_ext_kernel("eca_residual", "cpu")
                else "cpu -> x + eca_attention(...) (omnifm_ext has no eca_residual kernel)")
    psp = ("cpu -> ext, one compiled call each way" if _backend.has_ext_kernel("eca_psp", "cpu")
           else "cpu -> cat(eca_attention(...), r, suffix) (omnifm_ext has no eca_psp kernel)")
    spalign = ("cpu -> ext, one compiled call each way" if _backend.has_ext_kernel("spalign_loss", "cpu")
               else "cpu -> the reference (omnifm_ext has no spalign_loss kernel)")
    return {"cosine_topk": f"cpu ext bfloat16 screen: {screen}",
            "spalign_loss": f"{spalign}; cuda -> the reference (PyTorch's fused mse_loss)",
            "eca_attention": f"eca_residual (channel-first tokens, the adapter's spatial mode): {residual}; "
                             f"eca_psp (tokens with PSP, the adapter's sequence mode): {psp}; "
                             "cuda -> both compose eca_attention with the Triton core"}


def backend_info(dtype=torch.float32):
    """{"versions": {...}, "ops": {op: {device: {"backend": name | None, "skipped": {...}}}}}."""
    ops = {}
    for name, checks in OPS.items():
        ops[name] = {}
        for dev in ("cpu", "cuda"):
            try:
                choice = _backend.choose(checks(dev, dtype), dev, explain=True)
                ops[name][dev] = {"backend": choice.backend, "skipped": choice.skipped}
            except _backend.BackendUnavailableError as exc:
                ops[name][dev] = {"backend": None, "skipped": {"error": str(exc)}}
    return {"versions": _versions(), "forced": _backend.forced_backend(), "ops": ops, "notes": _notes()}
