"""Triton kernel of spectral_token: one program per sample does the whole token.

Per channel: the window DFT (window_block), magnitude, log1p, accumulated into
FreqMix F (bins, m); then F + embed -> W1, GELU -> W2 (tiled over d), GELU, mean over
the valid bins, L2 normalisation. Only the (d,) row is written. Windows up to
FUSED_MAX_SIZE fit one program; larger ones go through the lowpass kernel and the
PyTorch head (see spectral_token_triton).
"""
import torch
import triton
import triton.language as tl

from .._checks import new_output
from . import _window
from ._window import gelu, log1p, padded, window_bases, window_block
from .limits import SPECTRAL_FUSED_MAX_SIZE as FUSED_MAX_SIZE
from .lowpass_spectrum import lowpass_spectrum_triton

MAX_BLOCK_D = 64  # token columns per step of the second layer (tests shrink it)


@triton.jit
def _token_kernel(x_ptr, mix_ptr, embed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
                  ch_ptr, sh_ptr, cw_ptr, sw_ptr, C, H, W, K, M, HID, D, eps,
                  KB: tl.constexpr, MP: tl.constexpr, HP: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # Bin n of the padded (KB, KB) window is (i, j) = (n // KB, n % KB); real bins are
    # i, j < K, numbered i*K + j as in the reference's row-major flattening.
    n = tl.arange(0, KB * KB)
    bi, bj = n // KB, n % KB
    valid = (bi < K) & (bj < K)
    offs_m = tl.arange(0, MP)
    offs_h = tl.arange(0, HP)

    f = tl.load(embed_ptr + (bi * K + bj)[:, None] * M + offs_m[None, :],
                mask=valid[:, None] & (offs_m[None, :] < M), other=0.0)
    for c in range(0, C):
        re, im = window_block(x_ptr + (b * C + c) * H * W, ch_ptr, sh_ptr, cw_ptr, sw_ptr,
                              H, W, KB, 0, 0, KB, BLOCK_H, BLOCK_W)
        s = tl.reshape(log1p(tl.sqrt(re * re + im * im)), (KB * KB,))
        mix_c = tl.load(mix_ptr + offs_m * C + c, mask=offs_m < M, other=0.0)
        f += s[:, None] * mix_c[None, :]

    w1t = tl.load(w1_ptr + offs_h[None, :] * M + offs_m[:, None],
                  mask=(offs_h[None, :] < HID) & (offs_m[:, None] < M), other=0.0)
    b1 = tl.load(b1_ptr + offs_h, mask=offs_h < HID, other=0.0)
    # IEEE, not TF32: the interpreter (CI) computes IEEE, so CI tests the GPU's path.
    a1 = gelu(tl.dot(f, w1t, input_precision="ieee") + b1[None, :])

    # Pass 1: pooled (unnormalised) chunks of d go to out; pass 2 rescales them.
    sumsq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        w2t = tl.load(w2_ptr + offs_d[None, :] * HID + offs_h[:, None],
                      mask=(offs_d[None, :] < D) & (offs_h[:, None] < HID), other=0.0)
        b2 = tl.load(b2_ptr + offs_d, mask=offs_d < D, other=0.0)
        a2 = gelu(tl.dot(a1, w2t, input_precision="ieee") + b2[None, :])  # IEEE: see a1
        pooled = tl.sum(tl.where(valid[:, None], a2, 0.0), axis=0) / (K * K)
        pooled = tl.where(offs_d < D, pooled, 0.0)
        sumsq += pooled * pooled
        tl.store(out_ptr + b * D + offs_d, pooled, mask=offs_d < D)
    scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(sumsq, axis=0)), eps)
    tl.debug_barrier()  # pass 2 reads what other threads of this program wrote
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(out_ptr + b * D + offs_d, mask=offs_d < D, other=0.0)
        tl.store(out_ptr + b * D + offs_d, v * scale, mask=offs_d < D)


def spectral_token_triton(x, mix_weight, freq_embed, w1, b1, w2, b2, size, head):
    """x (B, C, H, W) float16/bfloat16/float32, float32 parameters -> (B, d) float32.

    head(s, params...) is the PyTorch token head used for windows too large to fuse.
    """
    if size > FUSED_MAX_SIZE:
        s = lowpass_spectrum_triton(x, size, True).float()
        return head(s, mix_weight, freq_embed, w1, b1, w2, b2)
    x = x.contiguous()
    params = [t.contiguous() for t in (mix_weight, freq_embed, w1, b1, w2, b2)]
    B, C, H, W = x.shape
    m, hid, d = mix_weight.shape[0], w1.shape[0], w2.shape[0]
    out = new_output((B, d), torch.float32, x.device)
    if B == 0:
        return out
    kb = padded(size)
    ch, sh, cw, sw = window_bases(H, W, size, kb, x.device)
    _token_kernel[(B,)](x, *params, out, ch, sh, cw, sw, C, H, W, size, m, hid, d, 1e-12,
                        KB=kb, MP=padded(m), HP=padded(hid), BLOCK_D=min(MAX_BLOCK_D, padded(d)),
                        BLOCK_H=_window.BLOCK_H, BLOCK_W=_window.BLOCK_W,
                        num_warps=8)  # (K*K, h) activations: more threads, fewer registers each
    return out
