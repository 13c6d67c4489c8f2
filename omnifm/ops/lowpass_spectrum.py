"""lowpass_spectrum: centred low-pass window of the 2-D DFT magnitude.

    lowpass_spectrum(x, size, *, log=False) -> (B, C, size, size)

The DFT uses "forward" normalisation (divided by H*W: the DC term is the mean
intensity, so images of different resolution give comparable spectra). The window
covers frequencies -size//2 ... size-1-size//2 on each axis in fftshift order; with
log=True the output is log1p of the magnitude.
"""
import torch

from . import _backend
from ._checks import check_image, compute_dtype
from ._dft import magnitude_grad, window_freqs

OP = "lowpass_spectrum"


def lowpass_spectrum_ref(x, size, log=False):
    """PyTorch reference (the contract): full FFT, the centred window, magnitude.

    The window is gathered from the unshifted spectrum (frequency f sits at index f mod
    N): the same entries as fftshift-then-crop, without shifting and taking the
    magnitude of the whole spectrum."""
    xc = x.to(compute_dtype(x.dtype))
    H, W = x.shape[-2:]
    spec = torch.fft.fft2(xc, norm="forward")
    f = window_freqs(size).to(x.device)
    out = spec.index_select(-2, f % H).index_select(-1, f % W).abs()
    return (torch.log1p(out) if log else out).to(x.dtype)


def backend_checks(dev, dtype):
    """{backend: () -> None | why not} for a tensor of this device type and dtype."""
    return {
        "reference": lambda: None,
        "ext": lambda: _backend.ext_status(OP, dev)
        or (None if dtype in (torch.float32, torch.float64) else f"ext takes float32/float64, not {dtype}"),
        "triton": lambda: _backend.triton_status(dev)
        or (None if dtype != torch.float64 else "the Triton kernel takes float16/bfloat16/float32"),
    }


def lowpass_spectrum(x, size, *, log=False):
    """Low-pass magnitude window of x (B, C, H, W) -> (B, C, size, size), x's dtype."""
    check_image(x, size)
    if not isinstance(log, bool):
        raise TypeError(f"log: expected a bool, got {type(log).__name__}")
    backend = _backend.backend_for(backend_checks, x.device.type, x.dtype)
    if backend == "ext":
        return torch.ops.omnifm.lowpass_spectrum(x, size, log)
    if backend == "triton":
        return torch.ops.omnifm.lowpass_spectrum_triton(x, size, log)
    return lowpass_spectrum_ref(x, size, log)


# --- registration: the Triton op (opaque custom_op) and the compiled op share the
# fake kernel and the backward (analytic adjoint of the windowed DFT).

@torch.library.custom_op("omnifm::lowpass_spectrum_triton", mutates_args=())
def _lowpass_spectrum_triton(x: torch.Tensor, size: int, log: bool) -> torch.Tensor:
    from .triton.lowpass_spectrum import lowpass_spectrum_triton

    return lowpass_spectrum_triton(x, size, log)


def _fake(x, size, log=False):
    return x.new_empty(x.shape[0], x.shape[1], size, size)


def _setup_context(ctx, inputs, output):
    x, size, log = inputs
    ctx.save_for_backward(x)
    ctx.size, ctx.log = size, log


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    cd = compute_dtype(x.dtype)
    grad_x = magnitude_grad(x.to(cd), ctx.size, grad.to(cd), ctx.log).to(x.dtype)
    return grad_x, None, None


_backend.register_fake_and_autograd(OP, _fake, _backward, _setup_context)
