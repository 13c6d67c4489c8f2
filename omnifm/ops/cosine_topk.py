"""cosine_topk: the k bank rows most cosine-similar to each query.

    cosine_topk(queries, bank, k, *, n_valid=None) -> (scores (B, k), indices (B, k))

score = ((q . b) * rq) * rb with r = 1 / max(|v|, 1e-12): a zero vector scores 0, not
NaN, and inputs need not be normalised. Sorted by descending score, ties broken by
the lower index, so results are deterministic. Only the first n_valid bank rows are
live (a pre-allocated bank can grow without reallocation); the rest are never read.
Scores are float32 (float64 if an input is float64); indices int64. Scores are
differentiable with respect to queries and bank.
"""
import torch

from . import _backend
from ._checks import check_int, check_same_device, check_tensor, compute_dtype

OP = "cosine_topk"
EPS = 1e-12


def inverse_norms(v):
    return 1.0 / v.norm(dim=-1).clamp_min(EPS)


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
    if not torch.compiler.is_compiling() and not torch.isfinite(queries).all():
        raise ValueError("queries: contains NaN or Inf")
    return n_valid


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


def cosine_topk(queries, bank, k, *, n_valid=None):
    """Top-k cosine matches of queries (B, d) in bank[:n_valid] (M, d); see module doc."""
    n_valid = _validate(queries, bank, k, n_valid)
    cd = _compute_dtype(queries, bank)
    backend = _backend.choose(backend_checks(queries.device.type, cd, k), queries.device.type).backend
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


_backend.register_fake_and_autograd(OP, _fake, _backward, _setup_context)
