"""cosine_topk: the k bank rows most cosine-similar to each query.

    cosine_topk(queries, bank, k, *, n_valid=None) -> (scores (B, k), indices (B, k))

score = ((q . b) * rq) * rb with r = 1 / max(|v|, 1e-12): a zero vector scores 0, not
NaN, and inputs need not be normalised. Sorted by descending score, ties broken by
the lower index, so results are deterministic. Only the first n_valid bank rows are
live (a pre-allocated bank can grow without reallocation); the rest are never read.
Scores are float32 (float64 if an input is float64); indices int64. Scores are
differentiable with respect to queries and bank.

On a CPU with bfloat16 instructions (AMX or AVX512-BF16), large float32 calls on the
compiled backend screen the bank in bfloat16 first and rescore only the rows that can
still enter the top k, exactly (see screen_bound): the answer is the same, bit for bit.
The bank's bfloat16 copy can be made once per bank version with prepare_bank() and
passed as `prepared=`; otherwise each call makes it.
"""
import functools
from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_int, check_same_device, check_tensor, compute_dtype

OP = "cosine_topk"
EPS = 1e-12


def inverse_norms(v):
    return inverse_of(v.norm(dim=-1))


def inverse_of(norms):
    """1 / max(norm, eps): the reference's expression, kept in one place (the kernels'
    scores must match it bit for bit)."""
    return 1.0 / norms.clamp_min(EPS)


def cosine_topk_ref(queries, bank, k, *, n_valid=None):
    """PyTorch reference (the contract): the full (B, n_valid) similarity, stable sort."""
    cd = _compute_dtype(queries, bank)
    q = queries.to(cd)
    b = bank[: bank.shape[0] if n_valid is None else n_valid].to(cd)
    sim = (q @ b.transpose(0, 1)) * inverse_norms(q)[:, None] * inverse_norms(b)[None, :]
    scores, indices = torch.sort(sim, dim=1, descending=True, stable=True)
    return scores[:, :k], indices[:, :k]


def _compute_dtype(queries, bank):
    return compute_dtype(torch.promote_types(queries.dtype, bank.dtype))


def _validate(queries, bank, k, n_valid):
    check_tensor(queries, "queries", ndim=2)
    check_tensor(bank, "bank", ndim=2)
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank: rows have d={bank.shape[1]}, queries have d={queries.shape[1]}")
    check_same_device(queries=queries, bank=bank)
    if bank.shape[0] < 1:
        raise ValueError("bank: has no rows")
    n_valid = bank.shape[0] if n_valid is None else n_valid
    check_int(n_valid, "n_valid", 1, bank.shape[0])
    check_int(k, "k", 1, n_valid)
    return n_valid


def _check_finite(queries):
    """The compiled kernel checks its queries' norms itself (one pass it makes anyway);
    the other backends check here."""
    if not torch.compiler.is_compiling() and not torch.isfinite(queries).all():
        raise ValueError("queries: contains NaN or Inf")


def backend_checks(dev, cd, k=1):
    """{backend: () -> None | why not} for a device type, compute dtype and k."""
    from .triton.limits import TOPK_MAX_K

    return {
        "reference": lambda: None,
        "ext": lambda: _backend.ext_status(OP, dev),
        "triton": lambda: _backend.triton_status(dev)
        or (None if cd == torch.float32 else "the Triton kernel computes in float32, not float64")
        or (None if k <= TOPK_MAX_K else f"the Triton kernel keeps at most k={TOPK_MAX_K}"),
    }


# --- the bfloat16 screen (CPU, float32): bound, prepared bank, dispatch.

# Where the screen beats the float32 kernel on this machine's CPU, measured by
# bench/bench_crossover.py --op cosine_topk. Without prepared=, each call pays for the
# bank's bfloat16 copy, which only many queries amortise; with it, from B >= 16 (fewer:
# the BLAS sums dots in another order, see screen_matches_reference).
SCREEN_MIN_QUERIES = {False: 256, True: 16}  # {prepared given: B}
SCREEN_MIN_ROWS = {False: 65536, True: 16384}  # {prepared given: n_valid}
PREPARE_CHUNK_ROWS = 16384
SCREEN_MIN_NORM = 2.0**-50
FLOAT32_UNIT = 2.0**-24
BFLOAT16_UNIT = 2.0**-8


def _gamma(n):
    return n * FLOAT32_UNIT / (1 - n * FLOAT32_UNIT)


def screen_bound(d):
    """E with |a - s| <= E for every row: s the exact float32 score (module doc), a the
    screen's bfloat16 score, for feature width d.

    Proof. u = 2^-24, ub = 2^-8, g(n) = n u / (1 - n u). rq, rb are the reference's
    float32 inverse norms; with R = 1 + g(d + 4), |q| rq <= R and |b| rb <= R (the
    norm's sum of squares, sqrt and reciprocal each round once per step; a norm of at
    least SCREEN_MIN_NORM = 2^-50 keeps the squares that underflow below 2^-149 d,
    relative 2^-49 d of the sum, far inside g(d); a zero row scores exactly 0). Let
    c = (q . b) rq rb, so |c| <= R^2.
    Exact: s = fl(fl(dot rq) rb) with |dot - q.b| <= g(d) |q||b| in any summation
    order, so |s - c| <= R^2 (g(2) + g(d)(1 + g(2))).
    Screen: each unit entry is fl(q_i rq) rounded to bfloat16, q_i rq (1 + e_i) with
    |e_i| <= e = (1 + u)(1 + ub) - 1, so the exact dot p of the two bfloat16 rows has
    |p - c| <= ((1 + e)^2 - 1) R^2. Products of bfloat16 values are exact in float32;
    accumulating them in float32 (AMX, AVX512-BF16 or a plain loop, in any order) adds
    at most g(d)(1 + e)^2 R^2, and rounding the result to bfloat16 at most ub times
    that sum's magnitude, <= ub (1 + e)^2 (1 + g(d)) R^2. Entries or partial sums
    below 2^-126 (flushed to zero) add at most 4 d 2^-126 in all; we add d 2^-100.
    E is the sum of these terms, then enlarged by 2^-20 relative for its own rounding.
    """
    ub, e = BFLOAT16_UNIT, (1 + FLOAT32_UNIT) * (1 + BFLOAT16_UNIT) - 1
    r2 = (1 + _gamma(d + 4)) ** 2
    exact = r2 * (_gamma(2) + _gamma(d) * (1 + _gamma(2)))
    screen = r2 * (((1 + e) ** 2 - 1) + _gamma(d) * (1 + e) ** 2 + ub * (1 + e) ** 2 * (1 + _gamma(d)))
    return (exact + screen + d * 2.0**-100) * (1 + 2.0**-20)


class PreparedBank(NamedTuple):
    """bank[:n_valid] as the screen reads it; made by prepare_bank()."""

    unit: torch.Tensor  # (n_valid, d) bfloat16: each row times its inverse norm
    inv_norms: torch.Tensor  # (n_valid,) float32: the reference's 1 / max(|row|, eps)
    n_valid: int
    source: tuple  # which bank, at which version: a change makes it stale
    in_range: bool  # every row's norm is 0 or >= SCREEN_MIN_NORM (screen_bound holds)


def _bank_identity(bank, n_valid):
    return (bank.data_ptr(), bank._version, tuple(bank.shape), tuple(bank.stride()), bank.dtype, n_valid)


def prepare_bank(bank, n_valid=None):
    """The bfloat16 copy and inverse norms of a float32 bank (M, d), made once per bank
    version and passed to cosine_topk(..., prepared=). Changing the bank in place
    (which bumps its version) makes the result stale: cosine_topk then refuses it."""
    check_tensor(bank, "bank", ndim=2)
    if bank.dtype != torch.float32:
        raise TypeError(f"bank: prepare_bank takes float32, got {bank.dtype}")
    n_valid = bank.shape[0] if n_valid is None else n_valid
    check_int(n_valid, "n_valid", 1, bank.shape[0])
    with torch.no_grad():
        live = bank[:n_valid]
        norms = live.norm(dim=-1)  # a non-finite entry makes its row's norm non-finite
        if not torch.isfinite(norms).all():
            raise ValueError("bank: contains NaN or Inf in its live rows (or a row's norm overflows)")
        in_range = _norms_in_range(norms)
        inv = inverse_of(norms)  # inverse_norms(live), without a second pass
        unit = torch.empty(live.shape, dtype=torch.bfloat16, device=bank.device)
        for r in range(0, n_valid, PREPARE_CHUNK_ROWS):  # in cache-sized chunks: half the time
            unit[r:r + PREPARE_CHUNK_ROWS].copy_(live[r:r + PREPARE_CHUNK_ROWS] * inv[r:r + PREPARE_CHUNK_ROWS, None])
    return PreparedBank(unit, inv, n_valid, _bank_identity(bank, n_valid), in_range)


def _norms_in_range(norms):
    return bool(((norms == 0) | (norms >= SCREEN_MIN_NORM)).all())


@functools.cache
def cpu_has_fast_bfloat16():
    """Whether this CPU multiplies bfloat16 in hardware (oneDNN: AMX or AVX512-BF16)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def screen_matches_reference(batch, d):
    """Whether the screen's exact scores equal the reference's bit for bit for batch
    queries of width d, probed once on random data. The screen sums each dot in index
    order with fused multiply-adds, as this machine's BLAS GEMM does per output, but a
    BLAS may block long rows (here d > 256), or treat a few queries (here < 16) or a
    bank of one row differently; where the probe differs, the float32 kernel runs."""
    g = torch.Generator().manual_seed(batch * 1009 + d)
    q, bank = torch.randn(batch, d, generator=g), torch.randn(512, d, generator=g)
    want = cosine_topk_ref(q, bank, 512)
    got = _screened(q, bank, 512, 512, None)
    return all(torch.equal(w, h) for w, h in zip(want, got))


def _use_screen(queries, bank, n_valid, prepared):
    if torch.compiler.is_compiling() or queries.dtype != torch.float32 or bank.dtype != torch.float32:
        return False
    if not _backend.has_ext_kernel("cosine_topk_screened", "cpu") or not cpu_has_fast_bfloat16():
        return False
    B, d = queries.shape
    if B < SCREEN_MIN_QUERIES[prepared is not None] or n_valid < SCREEN_MIN_ROWS[prepared is not None]:
        return False
    return screen_matches_reference(min(B, 64), d)


def _screened(queries, bank, k, n_valid, prepared):
    """The screen's answer, or None where screen_bound's premise fails (a row or query
    norm below SCREEN_MIN_NORM, or one that overflows): the float32 kernel then runs."""
    if prepared is None:
        prepared = prepare_bank(bank, n_valid)
    with torch.no_grad():
        norms = queries.norm(dim=-1)
        if not prepared.in_range or not _norms_in_range(norms) or not torch.isfinite(norms).all():
            return None
        rq = inverse_of(norms)  # inverse_norms(queries)
        q_unit = (queries * rq[:, None]).to(torch.bfloat16)
    return torch.ops.omnifm.cosine_topk_screened(queries, bank, q_unit, rq, prepared.unit, prepared.inv_norms,
                                                 k, n_valid, screen_bound(queries.shape[1]))


def _check_prepared(prepared, bank, n_valid):
    if not isinstance(prepared, PreparedBank):
        raise TypeError(f"prepared: expected a PreparedBank from prepare_bank(), got {type(prepared).__name__}")
    if prepared.source != _bank_identity(bank, n_valid):
        raise ValueError("prepared: made from another bank, another n_valid, or before the bank last changed; "
                         "call prepare_bank(bank, n_valid) again")


def cosine_topk(queries, bank, k, *, n_valid=None, prepared=None):
    """Top-k cosine matches of queries (B, d) in bank[:n_valid] (M, d); see module doc."""
    n_valid = _validate(queries, bank, k, n_valid)
    if prepared is not None:
        _check_prepared(prepared, bank, n_valid)
    cd = _compute_dtype(queries, bank)
    backend = _backend.backend_for(backend_checks, queries.device.type, cd, k)
    if backend != "ext":
        _check_finite(queries)
    if backend == "ext" and _use_screen(queries, bank, n_valid, prepared):
        out = _screened(queries, bank, k, n_valid, prepared)
        if out is not None:
            return out
    if backend == "reference":
        scores, indices = cosine_topk_ref(queries, bank, k, n_valid=n_valid)
        if not torch.compiler.is_compiling() and not torch.isfinite(scores).all():
            raise ValueError("bank: contains NaN or Inf in its live rows")
        return scores, indices
    if backend == "ext":
        return torch.ops.omnifm.cosine_topk(queries.to(cd), bank, k, n_valid)
    return torch.ops.omnifm.cosine_topk_triton(queries.to(cd), bank, k, n_valid)


# --- registration: fake kernel and the analytic backward of the selected scores.

@torch.library.custom_op("omnifm::cosine_topk_triton", mutates_args=())
def _cosine_topk_triton(queries: torch.Tensor, bank: torch.Tensor, k: int, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.cosine_topk import cosine_topk_triton

    return cosine_topk_triton(queries, bank, k, n_valid)


def _fake(queries, bank, k, n_valid):
    B = queries.shape[0]
    return queries.new_empty(B, k), queries.new_empty(B, k, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    queries, bank, k, n_valid = inputs
    ctx.save_for_backward(queries, bank, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_scores, _grad_indices):
    queries, bank, indices = ctx.saved_tensors
    cd = queries.dtype
    q = queries
    g = bank[indices].to(cd)  # (B, k, d) selected rows
    rq, rg = inverse_norms(q), inverse_norms(g)
    dots = (g * q[:, None, :]).sum(-1)  # (B, k)
    # d/dq of (q.g) rq rg; rq's own derivative vanishes where the eps clamp is active.
    q_live = (q.norm(dim=-1) > EPS).to(cd)[:, None]
    g_live = (g.norm(dim=-1) > EPS).to(cd)
    w = grad_scores * rq[:, None] * rg  # (B, k)
    grad_q = (w[..., None] * (g - (dots * rq[:, None] ** 2 * q_live)[..., None] * q[:, None, :])).sum(1)
    grad_g = w[..., None] * (q[:, None, :] - (dots * rg ** 2 * g_live)[..., None] * g)
    grad_bank = torch.zeros(bank.shape, dtype=cd, device=bank.device)
    grad_bank.index_add_(0, indices.reshape(-1), grad_g.reshape(-1, bank.shape[1]))
    return grad_q, grad_bank.to(bank.dtype), None, None


def _fake_backward(grad_scores, queries, bank, indices):
    return torch.empty_like(queries), torch.empty_like(bank)


# The compiled op's autograd is C++'s (cosine_topk_kernel.cpp, the same math as
# _backward): a Python-registered one would wrap every call, gradient or not.
_backend.register_fake_and_autograd(OP, _fake, _backward, _setup_context, ext_autograd=False)
if _backend.ext_status(OP, "cpu") is None:
    torch.library.register_fake("omnifm::cosine_topk_backward")(_fake_backward)


def _screened_fake(queries, bank, query_unit, query_inv_norms, bank_unit, bank_inv_norms, k, n_valid, bound):
    return _fake(queries, bank, k, n_valid)


def _screened_backward(ctx, grad_scores, grad_indices):
    return _backward(ctx, grad_scores, grad_indices) + (None,) * 5


if _backend.has_ext_kernel("cosine_topk_screened", "cpu"):
    torch.library.register_fake("omnifm::cosine_topk_screened")(_screened_fake)
    torch.library.register_autograd("omnifm::cosine_topk_screened", _screened_backward,
                                    setup_context=lambda ctx, inputs, output: _setup_context(
                                        ctx, (inputs[0], inputs[1], inputs[6], inputs[7]), output))
