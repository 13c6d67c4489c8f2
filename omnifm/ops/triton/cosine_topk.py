"""Triton kernel of cosine_topk.

Grid (query block, bank chunk); the query block varies fastest so programs that run
together share a bank chunk in L2. Each program streams its chunk in tiles of BN rows,
scores them with tl.dot, and merges them into a running top-KP per query. A (score,
index) pair is packed into one int64 key, order-preserving float bits high and the
complemented index low, so "higher score, then lower index" is plain integer order and
the merge is exact. The host then takes the top-k keys over the chunks and unpacks.
"""
import os

import torch
import triton
import triton.language as tl

from .._checks import new_output
from ..cosine_topk import inverse_norms
from .limits import TOPK_MAX_K

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

EMPTY = -(2**63)  # key of "no candidate": below every real key
LOW32 = 0xFFFFFFFF
# Tile sizes: query rows, bank rows, largest feature block (tl.dot needs each >= 16).
# Module-level so tests can shrink them and cross every tile with small shapes.
BQ, BN, BD_MAX = (32, 32, 64) if INTERPRET else (64, 64, 64)


@triton.jit
def _pack(score, index):
    score = score + 0.0  # -0.0 -> +0.0, so equal scores give equal keys
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - index.to(tl.int64))


@triton.jit
def _topk_kernel(q_ptr, bank_ptr, rq_ptr, keys_ptr, bad_ptr, B, D, n_valid, rows_per_chunk, n_chunks, eps,
                 KP: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid_q = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    q_live = offs_q < B
    rq = tl.load(rq_ptr + offs_q, mask=q_live, other=0.0)
    offs_kp = tl.arange(0, KP)
    best = tl.full((BQ, KP), -(2**63), tl.int64)
    start = chunk * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, n_valid)
    for r0 in range(start, end, BN):
        offs_n = r0 + tl.arange(0, BN)
        live = offs_n < end
        dots = tl.zeros((BQ, BN), dtype=tl.float32)
        sq = tl.zeros((BN,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            b = tl.load(bank_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :],
                        mask=live[:, None] & (offs_d[None, :] < D), other=0.0)
            q = tl.load(q_ptr + offs_q[:, None] * D + offs_d[None, :],
                        mask=q_live[:, None] & (offs_d[None, :] < D), other=0.0).to(b.dtype)
            bf = b.to(tl.float32)
            sq += tl.sum(bf * bf, axis=1)
            # IEEE float32 (the interpreter's arithmetic too): TF32's ~1e-3 error would reorder near-ties.
            dots = tl.dot(q, tl.trans(b), dots, input_precision="ieee")
        bad = live & ((sq != sq) | (sq == float("inf")))
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            tl.atomic_max(bad_ptr, tl.max(tl.where(bad, offs_n + 1, 0), axis=0))
        # Correctly rounded sqrt and division, as the reference computes them.
        rb = tl.math.div_rn(tl.full((BN,), 1.0, tl.float32), tl.maximum(tl.math.sqrt_rn(sq), eps))
        keys = _pack((dots * rq[:, None]) * rb[None, :], offs_n[None, :])
        keys = tl.where(live[None, :], keys, -(2**63))
        # Merge only when some key beats a query's current worst kept key.
        worst = tl.min(best, axis=1)
        if tl.max((tl.max(keys, axis=1) > worst).to(tl.int32), axis=0) > 0:
            merged = tl.full((BQ, KP), -(2**63), tl.int64)
            for j in range(KP):
                top = tl.maximum(tl.max(best, axis=1), tl.max(keys, axis=1))
                merged = tl.where(offs_kp[None, :] == j, top[:, None], merged)
                best = tl.where(best == top[:, None], -(2**63), best)
                keys = tl.where(keys == top[:, None], -(2**63), keys)
            best = merged
    out = keys_ptr + (offs_q.to(tl.int64)[:, None] * n_chunks + chunk) * KP + offs_kp[None, :]
    tl.store(out, best, mask=q_live[:, None])


def unpack(keys):
    """int64 keys -> (float32 scores, int64 indices)."""
    ordered = keys >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32), LOW32 - (keys & LOW32)


def cosine_topk_triton(queries, bank, k, n_valid, rows_per_chunk=None):
    """queries (B, d) float32, bank (M, d) float16/bfloat16/float32 -> float32 scores, int64 indices."""
    if k > TOPK_MAX_K:
        raise ValueError(f"k: the Triton kernel keeps at most {TOPK_MAX_K}, got {k}")
    q = queries.contiguous()
    bank = bank.contiguous()
    B, D = q.shape
    if B == 0:
        return new_output((0, k), torch.float32, q.device), torch.empty(0, k, dtype=torch.int64, device=q.device)
    rq = inverse_norms(q)
    KP = max(2, triton.next_power_of_2(k))
    BD = min(BD_MAX, max(16, triton.next_power_of_2(D)))
    n_qblocks = triton.cdiv(B, BQ)
    if rows_per_chunk is None:
        # Enough programs to fill the device; at least one tile per chunk.
        programs = 4 if INTERPRET else 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
        n_chunks = max(1, min(triton.cdiv(n_valid, BN), triton.cdiv(programs, n_qblocks)))
        rows_per_chunk = triton.cdiv(triton.cdiv(n_valid, n_chunks), BN) * BN
    n_chunks = triton.cdiv(n_valid, rows_per_chunk)
    keys = torch.empty(B, n_chunks, KP, dtype=torch.int64, device=q.device)
    bad = torch.zeros(1, dtype=torch.int32, device=q.device)
    _topk_kernel[(n_qblocks, n_chunks)](q, bank, rq, keys, bad, B, D, n_valid, rows_per_chunk, n_chunks, 1e-12,
                                        KP=KP, BQ=BQ, BN=BN, BD=BD)
    if bad.item() > 0:
        raise ValueError(f"bank: row {bad.item() - 1} is not finite (or its norm overflows)")
    top = torch.topk(keys.view(B, -1), k, dim=1).values
    return unpack(top)
