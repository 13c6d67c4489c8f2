"""Triton kernel of lowpass_spectrum: one program per (plane, window block)."""
import torch
import triton
import triton.language as tl

from .._checks import new_output
from . import _window
from ._window import log1p, padded, window_bases, window_block

MAX_BLOCK = 64  # window block edge: larger windows are tiled over the grid (tests shrink it)


@triton.jit
def _lowpass_kernel(x_ptr, out_ptr, ch_ptr, sh_ptr, cw_ptr, sw_ptr, H, W, K, PAD,
                    LOG: tl.constexpr, KB: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_W: tl.constexpr):
    plane = tl.program_id(0)
    u0 = tl.program_id(1) * KB
    v0 = tl.program_id(2) * KB
    re, im = window_block(x_ptr + plane.to(tl.int64) * H * W, ch_ptr, sh_ptr, cw_ptr, sw_ptr,
                          H, W, PAD, u0, v0, KB, BLOCK_H, BLOCK_W)
    mag = tl.sqrt(re * re + im * im)
    if LOG:
        mag = log1p(mag)
    rows = u0 + tl.arange(0, KB)
    cols = v0 + tl.arange(0, KB)
    ptrs = out_ptr + plane.to(tl.int64) * K * K + rows[:, None] * K + cols[None, :]
    tl.store(ptrs, mag.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < K) & (cols[None, :] < K))


def lowpass_spectrum_triton(x, size, log):
    """x (B, C, H, W) float16/bfloat16/float32 -> (B, C, size, size) in x's dtype."""
    x = x.contiguous()
    B, C, H, W = x.shape
    out = new_output((B, C, size, size), x.dtype, x.device)
    if out.numel() == 0:
        return out
    kb = padded(size, MAX_BLOCK)
    nblk = triton.cdiv(size, kb)
    ch, sh, cw, sw = window_bases(H, W, size, nblk * kb, x.device)
    grid = (B * C, nblk, nblk)
    _lowpass_kernel[grid](x, out, ch, sh, cw, sw, H, W, size, nblk * kb, LOG=log, KB=kb,
                          BLOCK_H=_window.BLOCK_H, BLOCK_W=_window.BLOCK_W)
    return out
