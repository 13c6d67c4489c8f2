"""Triton kernels of the ECA core: Z = softmax(r . at^T) vp with k keys.

One program per (sample, block of BL token rows). The logits (BL, KP) accumulate over
tiles of BD features (k padded to KP >= 16 for tl.dot, padded keys masked to -inf),
then a k-way softmax, then Z is written tile by tile of BDH output features: r is read
once and Z written once. The backward recomputes the softmax from r, writes dr, and
writes per-block partial sums of d(at) and d(vp) that the host reduces in a fixed order
(deterministic). Every dot is IEEE float32 (inputs of any dtype are computed in float32).
"""
import torch
import triton
import triton.language as tl

from .._checks import new_output
from ._window import padded

# Tile sizes: token rows, largest feature tile of r (d) and of Z (dh); tl.dot needs
# each >= 16. Module-level and read at call time, so tests can shrink them to cross
# every tile with small shapes.
BL, BD_MAX, BDH_MAX = 64, 128, 128


@triton.jit
def _softmax(logits, K, KP: tl.constexpr):
    """Row softmax over the first K of KP columns (the padded ones get 0)."""
    logits = tl.where(tl.arange(0, KP)[None, :] < K, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _eca_fwd_kernel(r_ptr, at_ptr, vp_ptr, z_ptr, L, D, K, DH,
                    BL: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr, KP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BL + tl.arange(0, BL)
    offs_k = tl.arange(0, KP)
    lm, km = offs_l < L, offs_k < K
    logits = tl.zeros((BL, KP), dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dm = offs_d < D
        r = tl.load(r_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :],
                    mask=lm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        at = tl.load(at_ptr + (b * K + offs_k[:, None]) * D + offs_d[None, :],
                     mask=km[:, None] & dm[None, :], other=0.0).to(tl.float32)
        # IEEE: the interpreter (CI) computes IEEE too, and with KP columns the op is
        # memory-bound, so TF32 would cost accuracy and buy nothing.
        logits = tl.dot(r, tl.trans(at), logits, input_precision="ieee")
    p = _softmax(logits, K, KP)
    for h0 in range(0, DH, BDH):
        offs_h = h0 + tl.arange(0, BDH)
        hm = offs_h < DH
        vp = tl.load(vp_ptr + (b * K + offs_k[:, None]) * DH + offs_h[None, :],
                     mask=km[:, None] & hm[None, :], other=0.0).to(tl.float32)
        z = tl.dot(p, vp, input_precision="ieee")  # IEEE: see the logits
        tl.store(z_ptr + (b * L + offs_l[:, None]) * DH + offs_h[None, :], z.to(z_ptr.dtype.element_ty),
                 mask=lm[:, None] & hm[None, :])


@triton.jit
def _eca_bwd_kernel(g_ptr, r_ptr, at_ptr, vp_ptr, dr_ptr, da_ptr, dvp_ptr, L, D, K, DH, NBLK,
                    BL: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr, KP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs_l = blk * BL + tl.arange(0, BL)
    offs_k = tl.arange(0, KP)
    lm, km = offs_l < L, offs_k < K
    part = b * NBLK + blk  # this block's slot in the partial sums
    logits = tl.zeros((BL, KP), dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dm = offs_d < D
        r = tl.load(r_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :],
                    mask=lm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        at = tl.load(at_ptr + (b * K + offs_k[:, None]) * D + offs_d[None, :],
                     mask=km[:, None] & dm[None, :], other=0.0).to(tl.float32)
        # IEEE: see the forward kernel.
        logits = tl.dot(r, tl.trans(at), logits, input_precision="ieee")
    p = _softmax(logits, K, KP)
    # Padded rows load g = 0, so they add nothing to d(vp), d p or (through it) d(at).
    gp = tl.zeros((BL, KP), dtype=tl.float32)  # d p = g vp^T
    for h0 in range(0, DH, BDH):
        offs_h = h0 + tl.arange(0, BDH)
        hm = offs_h < DH
        g = tl.load(g_ptr + (b * L + offs_l[:, None]) * DH + offs_h[None, :],
                    mask=lm[:, None] & hm[None, :], other=0.0).to(tl.float32)
        vp = tl.load(vp_ptr + (b * K + offs_k[:, None]) * DH + offs_h[None, :],
                     mask=km[:, None] & hm[None, :], other=0.0).to(tl.float32)
        gp = tl.dot(g, tl.trans(vp), gp, input_precision="ieee")  # IEEE: see the forward kernel
        dvp = tl.dot(tl.trans(p), g, input_precision="ieee")  # (KP, BDH); IEEE: as above
        tl.store(dvp_ptr + (part * K + offs_k[:, None]) * DH + offs_h[None, :], dvp,
                 mask=km[:, None] & hm[None, :])
    gl = p * (gp - tl.sum(p * gp, axis=1)[:, None])  # d logits
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dm = offs_d < D
        r = tl.load(r_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :],
                    mask=lm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        at = tl.load(at_ptr + (b * K + offs_k[:, None]) * D + offs_d[None, :],
                     mask=km[:, None] & dm[None, :], other=0.0).to(tl.float32)
        dr = tl.dot(gl, at, input_precision="ieee")  # IEEE: see the forward kernel
        tl.store(dr_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :], dr.to(dr_ptr.dtype.element_ty),
                 mask=lm[:, None] & dm[None, :])
        da = tl.dot(tl.trans(gl), r, input_precision="ieee")  # (KP, BD); IEEE: as above
        tl.store(da_ptr + (part * K + offs_k[:, None]) * D + offs_d[None, :], da,
                 mask=km[:, None] & dm[None, :])


def _config(d, dh):
    """(BL, BD, BDH): the tile sizes for feature sizes d and dh."""
    return BL, min(padded(d), BD_MAX), min(padded(dh), BDH_MAX)


def eca_core_triton(r, at, vp):
    """r (B, L, d), at (B, k, d), vp (B, k, dh) -> Z (B, L, dh) in r's dtype."""
    r, at, vp = r.contiguous(), at.contiguous(), vp.contiguous()
    B, L, d = r.shape
    k, dh = vp.shape[1], vp.shape[2]
    z = new_output((B, L, dh), r.dtype, r.device)
    if z.numel() == 0:
        return z
    bl, bd, bdh = _config(d, dh)
    _eca_fwd_kernel[(B, triton.cdiv(L, bl))](r, at, vp, z, L, d, k, dh, BL=bl, BD=bd, BDH=bdh, KP=padded(k))
    return z


def eca_core_backward_triton(grad, r, at, vp):
    """-> (dr, d_at, d_vp), the gradients of Z = softmax(r . at^T) vp."""
    grad, r, at, vp = grad.contiguous(), r.contiguous(), at.contiguous(), vp.contiguous()
    B, L, d = r.shape
    k, dh = vp.shape[1], vp.shape[2]
    dr = new_output((B, L, d), r.dtype, r.device)
    if B == 0 or L == 0:
        return dr, torch.zeros_like(at), torch.zeros_like(vp)
    bl, bd, bdh = _config(d, dh)
    nblk = triton.cdiv(L, bl)
    # Every slot is written by its block; poisoned in tests, so a missed one shows.
    da = new_output((B, nblk, k, d), torch.float32, r.device)
    dvp = new_output((B, nblk, k, dh), torch.float32, r.device)
    _eca_bwd_kernel[(B, nblk)](grad, r, at, vp, dr, da, dvp, L, d, k, dh, nblk, BL=bl, BD=bd, BDH=bdh,
                               KP=padded(k))
    return dr, da.sum(1).to(at.dtype), dvp.sum(1).to(vp.dtype)
