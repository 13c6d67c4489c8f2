"""The truncated DFT over one (H, W) plane, shared by the spectral Triton kernels.

For one block of the centred window (rows u0..u0+KB, columns v0..v0+KB):
    P = x @ Cw, Q = x @ Sw          (H, KB) streamed over W tiles
    Re += Ch @ P - Sh @ Q, Im += Ch @ Q + Sh @ P   accumulated over H tiles
so x is read once per window block and the full spectrum never exists.
"""
import torch
import triton
import triton.language as tl

from .._dft import complex_basis

MIN_DOT = 16  # tl.dot needs every dimension >= 16
# Plane tile streamed per step; read by the wrappers at call time, so tests can
# shrink it (down to MIN_DOT) to cross tiles on small images.
BLOCK_H = 32
BLOCK_W = 32


def padded(k, cap=None):
    p = max(MIN_DOT, triton.next_power_of_2(k))
    return min(p, cap) if cap else p


def window_bases(H, W, size, pad, device):
    """Row bases (pad, H) and column bases (W, pad) as cos / -sin, zero past size."""
    a_h = complex_basis(H, size, torch.float32, device)
    a_w = complex_basis(W, size, torch.float32, device)
    ch = torch.zeros(pad, H, device=device)
    sh = torch.zeros(pad, H, device=device)
    cw = torch.zeros(W, pad, device=device)
    sw = torch.zeros(W, pad, device=device)
    ch[:size], sh[:size] = a_h.real, a_h.imag
    cw[:, :size], sw[:, :size] = a_w.real.T, a_w.imag.T
    return ch, sh, cw, sw


@triton.jit
def window_block(plane_ptr, ch_ptr, sh_ptr, cw_ptr, sw_ptr, H, W, PAD, u0, v0,
                 KB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(re, im), each (KB, KB) float32, of one window block of a contiguous plane."""
    offs_k = tl.arange(0, KB)
    re = tl.zeros((KB, KB), dtype=tl.float32)
    im = tl.zeros((KB, KB), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        p = tl.zeros((BLOCK_H, KB), dtype=tl.float32)
        q = tl.zeros((BLOCK_H, KB), dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            xt = tl.load(plane_ptr + offs_h[:, None] * W + offs_w[None, :],
                         mask=(offs_h[:, None] < H) & (offs_w[None, :] < W), other=0.0).to(tl.float32)
            col = offs_w[:, None] * PAD + v0 + offs_k[None, :]
            cw = tl.load(cw_ptr + col, mask=offs_w[:, None] < W, other=0.0)
            sw = tl.load(sw_ptr + col, mask=offs_w[:, None] < W, other=0.0)
            # IEEE, not TF32: small bins left after cancellation need float32 accuracy,
            # and the interpreter (CI) computes IEEE, so CI tests the GPU's numeric path.
            p = tl.dot(xt, cw, p, input_precision="ieee")
            q = tl.dot(xt, sw, q, input_precision="ieee")
        row = (u0 + offs_k[:, None]) * H + offs_h[None, :]
        ch = tl.load(ch_ptr + row, mask=offs_h[None, :] < H, other=0.0)
        sh = tl.load(sh_ptr + row, mask=offs_h[None, :] < H, other=0.0)
        # IEEE for the same reason as above (TF32's ~1e-3 would dominate the error).
        re = tl.dot(ch, p, re, input_precision="ieee")
        re = tl.dot(-sh, q, re, input_precision="ieee")
        im = tl.dot(ch, q, im, input_precision="ieee")
        im = tl.dot(sh, p, im, input_precision="ieee")
    return re, im


@triton.jit
def log1p(m):
    """log(1 + m) for m >= 0, accurate for small m (Kahan: triton has no log1p)."""
    u = 1.0 + m
    du = tl.where(u == 1.0, 1.0, u - 1.0)  # both branches are evaluated: no 0/0
    return tl.where(u == 1.0, m, tl.log(u) * (m / du))


@triton.jit
def gelu(h):
    """Exact (erf) GELU, as torch.nn.GELU()."""
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
