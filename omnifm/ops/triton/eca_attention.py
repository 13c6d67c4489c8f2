"""Triton kernels of the ECA core: Z = softmax(r . at^T) vp with k keys.

One program per (sample, block of BL token rows): the logits are a (BL, d) x (d, KP)
product (k padded to KP >= 16 for tl.dot, padded keys masked to -inf), a k-way
softmax, and a (BL, KP) x (KP, dh) product. r is read once and Z written once. The
backward recomputes the softmax from r, writes dr, and writes per-block partial sums
of d(at) and d(vp) that the host reduces in a fixed order (deterministic).
"""
import torch
import triton
import triton.language as tl

from .._checks import new_output
from ._window import DOT_PRECISION, padded


@triton.jit
def _probs(r, at, K, KP: tl.constexpr, PRECISION: tl.constexpr):
    logits = tl.dot(r, tl.trans(at), input_precision=PRECISION)  # (BL, KP)
    logits = tl.where(tl.arange(0, KP)[None, :] < K, logits, float("-inf"))
    m = tl.max(logits, axis=1)
    e = tl.exp(logits - m[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _eca_fwd_kernel(r_ptr, at_ptr, vp_ptr, z_ptr, L, D, K, DH,
                    BL: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr, KP: tl.constexpr,
                    PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BL + tl.arange(0, BL)
    offs_d, offs_h, offs_k = tl.arange(0, BD), tl.arange(0, BDH), tl.arange(0, KP)
    lm = offs_l < L
    r = tl.load(r_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :],
                mask=lm[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    at = tl.load(at_ptr + (b * K + offs_k[:, None]) * D + offs_d[None, :],
                 mask=(offs_k[:, None] < K) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    vp = tl.load(vp_ptr + (b * K + offs_k[:, None]) * DH + offs_h[None, :],
                 mask=(offs_k[:, None] < K) & (offs_h[None, :] < DH), other=0.0).to(tl.float32)
    p = _probs(r, at, K, KP, PRECISION)
    z = tl.dot(p, vp, input_precision=PRECISION)
    tl.store(z_ptr + (b * L + offs_l[:, None]) * DH + offs_h[None, :], z.to(z_ptr.dtype.element_ty),
             mask=lm[:, None] & (offs_h[None, :] < DH))


@triton.jit
def _eca_bwd_kernel(g_ptr, r_ptr, at_ptr, vp_ptr, dr_ptr, da_ptr, dvp_ptr, L, D, K, DH, NBLK,
                    BL: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr, KP: tl.constexpr,
                    PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs_l = blk * BL + tl.arange(0, BL)
    offs_d, offs_h, offs_k = tl.arange(0, BD), tl.arange(0, BDH), tl.arange(0, KP)
    lm = offs_l < L
    km = offs_k < K
    r = tl.load(r_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :],
                mask=lm[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    g = tl.load(g_ptr + (b * L + offs_l[:, None]) * DH + offs_h[None, :],
                mask=lm[:, None] & (offs_h[None, :] < DH), other=0.0).to(tl.float32)
    at = tl.load(at_ptr + (b * K + offs_k[:, None]) * D + offs_d[None, :],
                 mask=km[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    vp = tl.load(vp_ptr + (b * K + offs_k[:, None]) * DH + offs_h[None, :],
                 mask=km[:, None] & (offs_h[None, :] < DH), other=0.0).to(tl.float32)
    p = _probs(r, at, K, KP, PRECISION)
    p = tl.where(lm[:, None], p, 0.0)  # padded rows contribute nothing to the sums
    gp = tl.dot(g, tl.trans(vp), input_precision=PRECISION)  # (BL, KP)
    gl = p * (gp - tl.sum(p * gp, axis=1)[:, None])
    dr = tl.dot(gl, at, input_precision=PRECISION)
    tl.store(dr_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :], dr.to(dr_ptr.dtype.element_ty),
             mask=lm[:, None] & (offs_d[None, :] < D))
    part = b * NBLK + blk
    da = tl.dot(tl.trans(gl), r, input_precision=PRECISION)  # (KP, BD)
    tl.store(da_ptr + (part * K + offs_k[:, None]) * D + offs_d[None, :], da,
             mask=km[:, None] & (offs_d[None, :] < D))
    dvp = tl.dot(tl.trans(p), g, input_precision=PRECISION)  # (KP, BDH)
    tl.store(dvp_ptr + (part * K + offs_k[:, None]) * DH + offs_h[None, :], dvp,
             mask=km[:, None] & (offs_h[None, :] < DH))


def _config(L, d, dh):
    bd, bdh = padded(d), padded(dh)
    # Keep a (BL, max(d, dh)) tile around 8K elements; BL is a power of two >= 16.
    bl = max(16, min(128, triton.next_power_of_2(max(1, 8192 // max(bd, bdh)))))
    return bl, bd, bdh


def eca_core_triton(r, at, vp):
    """r (B, L, d), at (B, k, d), vp (B, k, dh) -> Z (B, L, dh) in r's dtype."""
    r, at, vp = r.contiguous(), at.contiguous(), vp.contiguous()
    B, L, d = r.shape
    k, dh = vp.shape[1], vp.shape[2]
    z = new_output((B, L, dh), r.dtype, r.device)
    if z.numel() == 0:
        return z
    bl, bd, bdh = _config(L, d, dh)
    _eca_fwd_kernel[(B, triton.cdiv(L, bl))](r, at, vp, z, L, d, k, dh, BL=bl, BD=bd, BDH=bdh, KP=padded(k),
                                             PRECISION=DOT_PRECISION)
    return z


def eca_core_backward_triton(grad, r, at, vp):
    """-> (dr, d_at, d_vp), the gradients of Z = softmax(r . at^T) vp."""
    grad, r, at, vp = grad.contiguous(), r.contiguous(), at.contiguous(), vp.contiguous()
    B, L, d = r.shape
    k, dh = vp.shape[1], vp.shape[2]
    bl, bd, bdh = _config(L, d, dh)
    nblk = max(1, triton.cdiv(L, bl))
    dr = new_output((B, L, d), r.dtype, r.device)
    da = torch.zeros(B, nblk, k, d, dtype=torch.float32, device=r.device)
    dvp = torch.zeros(B, nblk, k, dh, dtype=torch.float32, device=r.device)
    if B and L:
        _eca_bwd_kernel[(B, nblk)](grad, r, at, vp, dr, da, dvp, L, d, k, dh, nblk, BL=bl, BD=bd, BDH=bdh,
                                   KP=padded(k), PRECISION=DOT_PRECISION)
    return dr, da.sum(1).to(at.dtype), dvp.sum(1).to(vp.dtype)
