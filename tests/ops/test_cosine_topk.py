import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.ops import cosine_topk, cosine_topk_ref
from tests.helpers import fast_backends, forced, relerr

BACKENDS = fast_backends("cosine_topk")


def oracle_scores(queries, bank):
    """Independent float64 cosine similarity (numpy), zero vectors scoring 0."""
    q = queries.detach().double().cpu().numpy()
    b = bank.detach().double().cpu().numpy()
    nq = np.maximum(np.linalg.norm(q, axis=1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return torch.from_numpy((q @ b.T) / nq[:, None] / nb[None, :])


def oracle_topk(queries, bank, k):
    sim = oracle_scores(queries, bank).numpy()
    order = np.lexsort((np.broadcast_to(np.arange(sim.shape[1]), sim.shape), -sim), axis=1)[:, :k]
    return torch.from_numpy(np.take_along_axis(sim, order, 1)), torch.from_numpy(order)


@st.composite
def topk_cases(draw, max_m=300, integer=False):
    B, M, d = draw(st.integers(1, 40)), draw(st.integers(1, max_m)), draw(st.integers(1, 48))
    n_valid = draw(st.integers(1, M))
    k = draw(st.integers(1, min(n_valid, 70)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if integer:  # exact dot products: ties are exact in every backend
        q = torch.randint(-3, 4, (B, d), generator=g).double()
        bank = torch.randint(-3, 4, (M, d), generator=g).double()
    else:
        q, bank = torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(M, d, generator=g, dtype=torch.float64)
    # Duplicated rows (ties), zero rows and zero queries.
    n_dup = draw(st.integers(0, M // 2))
    if n_dup:
        src = torch.randint(0, M, (n_dup,), generator=g)
        dst = torch.randint(0, M, (n_dup,), generator=g)
        bank[dst] = bank[src]
    if draw(st.booleans()):
        bank[torch.randint(0, M, (max(1, M // 10),), generator=g)] = 0
    if draw(st.booleans()):
        q[0] = 0
    return q, bank, k, n_valid


@given(topk_cases(integer=True))
@settings(max_examples=40)
def test_reference_breaks_ties_by_lower_index(case):
    """Duplicated rows tie exactly: equal scores come in ascending index order, and a
    row is never returned while an identical row with a lower index is left out."""
    q, bank, k, n_valid = case
    scores, indices = cosine_topk_ref(q, bank, k, n_valid=n_valid)
    live = bank[:n_valid]
    for b in range(q.shape[0]):
        idx = indices[b].tolist()
        for j in range(k - 1):
            if scores[b, j] == scores[b, j + 1]:
                assert idx[j] < idx[j + 1]
        for i in idx:
            twins = (live[:i] == live[i]).all(1).nonzero().flatten().tolist()
            assert all(t in idx for t in twins), (b, i, twins)


@given(st.one_of(topk_cases(), topk_cases(integer=True)))
@settings(max_examples=40)
def test_reference_matches_oracle(case):
    q, bank, k, n_valid = case
    scores, indices = cosine_topk_ref(q, bank, k, n_valid=n_valid)
    want_s, _ = oracle_topk(q, bank[:n_valid], k)
    assert torch.allclose(scores, want_s, atol=1e-12)
    # The returned indices really carry the returned scores.
    true = torch.gather(oracle_scores(q, bank), 1, indices)
    assert torch.allclose(true, scores, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=topk_cases(integer=True), bank_dtype=st.sampled_from([torch.float32, torch.float16]))
@settings(max_examples=25)
def test_fast_equals_reference_exactly_with_ties(backend, device, case, bank_dtype):
    """Integer data: dot products are exact, so every backend must return exactly the
    reference's scores and, among tied rows, the lower index first."""
    q, bank, k, n_valid = case
    q, bank = q.float().to(device), bank.to(bank_dtype).to(device)
    with forced(backend):
        scores, indices = cosine_topk(q, bank, k, n_valid=n_valid)
    ref_s, ref_i = cosine_topk_ref(q, bank, k, n_valid=n_valid)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, ref_i)
    assert torch.equal(scores, ref_s)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=topk_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=25)
def test_fast_matches_reference(backend, device, case, dtype):
    q, bank, k, n_valid = case
    if backend == "triton":
        dtype = torch.float32
    q, bank = q.to(device, dtype), bank.to(device, dtype)
    with forced(backend):
        scores, indices = cosine_topk(q, bank, k, n_valid=n_valid)
    ref_s, _ = cosine_topk_ref(q.double(), bank.double(), k, n_valid=n_valid)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(scores.double(), ref_s, atol=tol), "scores"
    assert (indices < n_valid).all() and (indices >= 0).all()
    # Each returned index carries its score, and the order is descending.
    true = torch.gather(oracle_scores(q, bank), 1, indices.cpu())
    assert torch.allclose(true, scores.double().cpu(), atol=tol)
    assert (scores[:, 1:] <= scores[:, :-1]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dead_rows_are_never_read(backend, device):
    """Rows past n_valid may hold anything (here NaN): they change nothing."""
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(9, 16, generator=g), torch.randn(200, 16, generator=g)
    bank[150:] = float("nan")
    with forced(backend):
        scores, indices = cosine_topk(q.to(device), bank.to(device), 4, n_valid=150)
    ref_s, ref_i = cosine_topk_ref(q, bank[:150], 4)
    assert torch.equal(indices.cpu(), ref_i) and relerr(scores, ref_s) < 1e-6


def test_triton_chunk_merge():
    """Small chunks force the cross-chunk merge of running top-k lists."""
    if "triton" not in dict(BACKENDS):
        pytest.skip("triton not available here")
    from omnifm.ops.triton.cosine_topk import cosine_topk_triton

    device = dict(BACKENDS)["triton"]
    g = torch.Generator().manual_seed(2)
    q, bank = torch.randint(-2, 3, (33, 24), generator=g).float(), torch.randint(-2, 3, (300, 24), generator=g).float()
    for rows in (32, 96):
        s, i = cosine_topk_triton(q.to(device), bank.to(device), 20, 290, rows_per_chunk=rows)
        ref_s, ref_i = cosine_topk_ref(q, bank, 20, n_valid=290)
        assert torch.equal(i.cpu(), ref_i) and torch.equal(s.cpu(), ref_s), rows


@pytest.mark.gpu
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_large_bank_gpu(bank_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(512, 128, device="cuda", generator=g)
    bank = torch.randn(300_000, 128, device="cuda", generator=g).to(bank_dtype)
    with forced("triton"):
        scores, indices = cosine_topk(q, bank, 8)
    ref_s, _ = cosine_topk_ref(q, bank, 8)
    assert torch.allclose(scores, ref_s, atol=2e-3 if bank_dtype != torch.float32 else 1e-3)


def test_gradcheck_reference():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cosine_topk_ref(a, b, 3)[0], (q, bank))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fast_backward(backend, device):
    dtype = torch.float64 if backend == "ext" else torch.float32
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 6, generator=g, dtype=torch.float64)
    bank = torch.randn(30, 6, generator=g, dtype=torch.float64)
    q[1] = 2 * q[0]  # two queries pick the same rows: their gradients accumulate
    if dtype == torch.float64:
        with forced(backend):
            assert torch.autograd.gradcheck(lambda a, b: cosine_topk(a, b, 4, n_valid=25)[0],
                                            (q.clone().requires_grad_(), bank.clone().requires_grad_()))
    qf, bf = q.to(device, dtype).clone().requires_grad_(), bank.to(device, dtype).clone().requires_grad_()
    qr, br = q.clone().requires_grad_(), bank.clone().requires_grad_()
    with forced(backend):
        s, _ = cosine_topk(qf, bf, 4, n_valid=25)
    up = torch.randn(s.shape, generator=g, dtype=torch.float64)
    s.backward(up.to(device, dtype))
    cosine_topk_ref(qr, br, 4, n_valid=25)[0].backward(up)
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    assert relerr(qf.grad, qr.grad) < bound and relerr(bf.grad, br.grad) < bound


@pytest.mark.parametrize("qualname", ["omnifm::cosine_topk", "omnifm::cosine_topk_triton"])
def test_opcheck(qualname):
    backend = "triton" if qualname.endswith("triton") else "ext"
    if backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    device = dict(BACKENDS)[backend]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 16, generator=g).to(device).requires_grad_()
    bank = torch.randn(90, 16, generator=g).to(device).requires_grad_()
    torch.library.opcheck(getattr(torch.ops.omnifm, qualname.split("::")[1]), (q, bank, 3, 80))


@pytest.mark.parametrize("backend", ["reference", "ext"])
def test_torch_compile_fullgraph(backend):
    if backend != "reference" and backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    q, bank = torch.randn(8, 12), torch.randn(50, 12)

    def retrieve(q, bank):
        scores, indices = cosine_topk(q, bank, 2, n_valid=40)
        return scores.sum(1) + bank[indices].mean((1, 2))

    with forced(backend):
        out = torch.compile(retrieve, fullgraph=True, backend="aot_eager")(q, bank)
        assert torch.allclose(out, retrieve(q, bank))


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
def test_errors_name_the_argument(backend):
    if backend != "reference" and backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    q, bank = torch.randn(4, 8), torch.randn(20, 8)
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    inf_bank = bank.clone()
    inf_bank[5, 0] = float("inf")
    cases = [
        (lambda: cosine_topk(q[0], bank, 2), ValueError, "queries"),
        (lambda: cosine_topk(q.long(), bank, 2), TypeError, "queries"),
        (lambda: cosine_topk(q, bank[:, :4], 2), ValueError, "bank"),
        (lambda: cosine_topk(q, bank[None], 2), ValueError, "bank"),
        (lambda: cosine_topk(q, bank[:0], 1), ValueError, "bank"),
        (lambda: cosine_topk(q, bank.to("meta"), 2), ValueError, "bank"),
        (lambda: cosine_topk(q, bank, 0), ValueError, "k"),
        (lambda: cosine_topk(q, bank, 21), ValueError, "k"),
        (lambda: cosine_topk(q, bank, 6, n_valid=5), ValueError, "k"),
        (lambda: cosine_topk(q, bank, 2.0), TypeError, "k"),
        (lambda: cosine_topk(q, bank, 2, n_valid=0), ValueError, "n_valid"),
        (lambda: cosine_topk(q, bank, 2, n_valid=21), ValueError, "n_valid"),
        (lambda: cosine_topk(nan_q, bank, 2), ValueError, "queries"),
        (lambda: cosine_topk(q, inf_bank, 2), ValueError, "bank"),
    ]
    with forced(backend):
        for fn, exc, name in cases:
            with pytest.raises(exc, match=rf"^{name}:"):
                fn()
