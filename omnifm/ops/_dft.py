"""The centred low-pass DFT window as matrix products, in plain PyTorch.

X = A_H x A_W^T with A_N[i, n] = exp(-2*pi*1j*f_i*n/N) / N over the window
frequencies f_i = i - K//2. This reads x once and never builds the full spectrum.
The fused kernels use the same bases; here the form serves the backward passes of
the fused ops (recompute, then the analytic adjoint) on every device.
"""
import math

import torch


def window_freqs(size):
    """Frequencies of the centred window, fftshift order: -K//2 ... K-1-K//2."""
    return torch.arange(size, dtype=torch.int64) - size // 2


def complex_basis(n, size, real_dtype, device):
    """(size, n) complex basis for one axis, in the complex dtype matching real_dtype.

    Built per call (a few KiB): a cache would also capture fake tensors when the
    first call happens under torch.compile tracing.
    """
    cdtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
    # Reduce the phase modulo n in integers first, so large n keeps full accuracy.
    f = window_freqs(size) % n
    phase = (f[:, None] * torch.arange(n)[None, :]) % n
    angle = phase.to(torch.float64) * (2 * math.pi / n)
    return torch.polar(torch.full_like(angle, 1.0 / n), -angle).to(dtype=cdtype, device=device)


def window_dft(x, size):
    """x (..., H, W) real float32/float64 -> complex (..., K, K) window of the DFT."""
    a_h = complex_basis(x.shape[-2], size, x.dtype, x.device)
    a_w = complex_basis(x.shape[-1], size, x.dtype, x.device)
    return a_h @ x.to(a_h.dtype) @ a_w.transpose(0, 1)


def window_dft_adjoint(g, x_shape, real_dtype):
    """Gradient wrt x of Re(sum(g * X)) for X = window_dft(x): Re(A_H^T g A_W)."""
    a_h = complex_basis(x_shape[-2], g.shape[-2], real_dtype, g.device)
    a_w = complex_basis(x_shape[-1], g.shape[-1], real_dtype, g.device)
    return (a_h.transpose(0, 1) @ g @ a_w).real


def magnitude_grad(x, size, grad_mag, log):
    """dL/dx given dL/d|X| (or dL/dlog1p|X| when log) for the window of x."""
    X = window_dft(x, size)
    mag = X.abs()
    g = grad_mag / (1 + mag) if log else grad_mag
    # d|X|/dX* convention: the real gradient is Re(conj(sgn X) * dX); sgn(0) = 0 as in torch.
    return window_dft_adjoint(g * torch.sgn(X).conj(), x.shape, x.dtype)
