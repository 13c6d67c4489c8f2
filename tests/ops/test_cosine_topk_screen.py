"""The bfloat16 screen of cosine_topk (CPU ext): its error bound, exactness against the
reference bit for bit (scores and indices, ties to the lower index), the prepared bank
and the dispatch rules. The screen runs on any CPU (ATen multiplies bfloat16 without
hardware support too, only slower), so these tests do not need AMX."""
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.ops import PreparedBank, cosine_topk, cosine_topk_ref, prepare_bank
from omnifm.ops import _backend
from tests.helpers import forced

topk_module = sys.modules["omnifm.ops.cosine_topk"]
pytestmark = pytest.mark.skipif(not _backend.has_ext_kernel("cosine_topk_screened", "cpu"),
                                reason="omnifm_ext has no cosine_topk_screened kernel")
TILE_ROWS, QUERY_BLOCK = 4096, 1024  # the kernel's tiling (cosine_topk_screened_kernel.cpp)


def screened(q, bank, k, n_valid=None, bound=None):
    """The screen called directly (no dispatch rules), optionally with another bound."""
    n_valid = bank.shape[0] if n_valid is None else n_valid
    p = prepare_bank(bank, n_valid)
    assert p.in_range, "a test case outside screen_bound's premise"
    rq = topk_module.inverse_norms(q)
    qu = (q * rq[:, None]).to(torch.bfloat16)
    bound = topk_module.screen_bound(q.shape[1]) if bound is None else bound
    return torch.ops.omnifm.cosine_topk_screened(q, bank, qu, rq, p.unit, p.inv_norms, k, n_valid, bound)


def assert_bitwise(got, want, what):
    (gs, gi), (ws, wi) = got, want
    assert torch.equal(gi, wi), f"{what}: indices differ at {(gi != wi).nonzero()[:4].tolist()}"
    assert torch.equal(gs, ws), f"{what}: scores differ, max {(gs - ws).abs().max().item():.3e}"


@st.composite
def near_tie_cases(draw, max_m=700):
    """float32 queries (B >= 16) and banks with the screen's hard cases: rows that differ
    from one another below bfloat16 resolution (near-ties the screen cannot separate),
    exact duplicates (ties, lower index first), zero rows, scaled rows (tiny and large
    norms), and poisoned rows past n_valid that must never be read."""
    # n_valid >= 2: for a single row the BLAS takes its matrix-vector path, another
    # summation order (the dispatcher screens from thousands of rows).
    B, M, d = draw(st.integers(16, 40)), draw(st.integers(2, max_m)), draw(st.integers(1, 256))
    n_valid = draw(st.integers(2, M))
    k = draw(st.integers(1, min(n_valid, 40)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, bank = torch.randn(B, d, generator=g), torch.randn(M, d, generator=g)
    n_near = draw(st.integers(0, n_valid))
    if n_near:  # one row plus perturbations far below a bfloat16 ulp (2^-8 relative)
        rows = torch.randint(0, n_valid, (n_near,), generator=g)
        eps = draw(st.sampled_from([1e-7, 1e-5, 1e-3]))
        bank[rows] = bank[rows[0]] + eps * torch.randn(n_near, d, generator=g)
        if draw(st.booleans()):  # queries aligned with it: the near-ties are the top k
            q[: B // 2] = bank[rows[0]] + 1e-4 * torch.randn(B // 2, d, generator=g)
    n_dup = draw(st.integers(0, n_valid // 2))
    if n_dup:
        bank[torch.randint(0, n_valid, (n_dup,), generator=g)] = bank[torch.randint(0, n_valid, (n_dup,), generator=g)]
    if draw(st.booleans()):
        bank[torch.randint(0, n_valid, (max(1, n_valid // 10),), generator=g)] = 0
    # Scales within the bound's premise (norms >= 2^-50 and squares finite).
    bank, q = bank * draw(st.sampled_from([1.0, 1e-12, 1e15])), q * draw(st.sampled_from([1.0, 1e-10, 1e12]))
    bank[n_valid:] = float("nan")
    return q, bank, k, n_valid


@given(near_tie_cases())
@settings(max_examples=200, deadline=None)
def test_screen_equals_reference_bitwise(case):
    q, bank, k, n_valid = case
    assert_bitwise(screened(q, bank, k, n_valid), cosine_topk_ref(q, bank, k, n_valid=n_valid), "screen")


@given(near_tie_cases(max_m=300))
@settings(max_examples=100, deadline=None)
def test_screen_bound_holds_for_every_row(case):
    """|a - s| <= screen_bound(d) for every (query, row): a the bfloat16 score as the
    kernel gets it (ATen's bfloat16 GEMM), s the reference's exact float32 score."""
    q, bank, _, n_valid = case
    live = bank[:n_valid]
    p = prepare_bank(bank, n_valid)
    qu = (q * topk_module.inverse_norms(q)[:, None]).to(torch.bfloat16)
    approx = (qu @ p.unit.T).double()
    exact = (q @ live.T) * topk_module.inverse_norms(q)[:, None] * topk_module.inverse_norms(live)[None, :]
    err = (approx - exact.double()).abs().max().item()
    assert err <= topk_module.screen_bound(q.shape[1]), err


def test_bound_is_what_keeps_near_ties_exact():
    """The tests above can fail: the same near-tie data with a bound of 0 (or a tenth
    of the proven one) lets the screen drop a row of the true top k."""
    g = torch.Generator().manual_seed(7)
    d, M = 64, 3 * TILE_ROWS  # later tiles are screened against the running exact k-th score
    base = torch.randn(d, generator=g)
    bank = base + 3e-2 * torch.randn(M, d, generator=g)  # cosines ~0.76, within a bfloat16 ulp
    q = base + torch.randn(32, d, generator=g)  # of one another for each query
    want = cosine_topk_ref(q, bank, 5)
    assert_bitwise(screened(q, bank, 5), want, "proven bound")
    for bound in (0.0, topk_module.screen_bound(d) / 10):
        s, i = screened(q, bank, 5, bound=bound)
        assert not torch.equal(i, want[1]), f"bound {bound} still found every row: the data is too easy"


@pytest.mark.parametrize("B,M,k", [(QUERY_BLOCK + 5, 2 * TILE_ROWS + 3, 3), (17, TILE_ROWS, 1), (64, TILE_ROWS + 1, 40)])
def test_screen_across_tiles_and_query_blocks(B, M, k):
    """Shapes that cross the kernel's row tiles and query blocks, with the best rows of
    some queries on tile edges (row 4095, 4096) and exact duplicates across tiles."""
    g = torch.Generator().manual_seed(B + M)
    q, bank = torch.randn(B, 128, generator=g), torch.randn(M, 128, generator=g)
    edges = [r for r in (0, TILE_ROWS - 1, TILE_ROWS, M - 1) if r < M]
    for j, r in enumerate(edges):
        bank[r] = q[j] * 3
    if M > TILE_ROWS:
        bank[TILE_ROWS] = bank[TILE_ROWS - 1]  # a tie split across two tiles
    assert_bitwise(screened(q, bank, k), cosine_topk_ref(q, bank, k), f"B={B} M={M}")


def test_all_rows_equal_ties_go_to_the_lowest_indices():
    bank = torch.ones(TILE_ROWS + 100, 8)
    q = torch.randn(20, 8).abs()
    s, i = screened(q, bank, 4)
    assert torch.equal(i, torch.arange(4).expand(20, 4))
    assert_bitwise((s, i), cosine_topk_ref(q, bank, 4), "all equal")


def test_gradients_match_the_reference():
    g = torch.Generator().manual_seed(3)
    q0, b0 = torch.randn(20, 32, generator=g), torch.randn(500, 32, generator=g)
    probe = torch.randn(20, 3, generator=g)
    grads = {}
    for name in ("screen", "reference"):
        q, b = q0.clone().requires_grad_(), b0.clone().requires_grad_()
        if name == "screen":
            s, _ = torch.ops.omnifm.cosine_topk_screened(
                q, b, *_unit(q), *prepare_bank(b0)[:2], 3, 500, topk_module.screen_bound(32))
        else:
            s, _ = cosine_topk_ref(q, b, 3)
        (s * probe).sum().backward()
        grads[name] = (q.grad, b.grad)
    for got, want in zip(grads["screen"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _unit(q):
    rq = topk_module.inverse_norms(q.detach())
    return (q.detach() * rq[:, None]).to(torch.bfloat16), rq


# --- prepared bank

def test_prepare_bank_is_the_reference_normalisation():
    bank = torch.randn(300, 16)
    p = prepare_bank(bank, 200)
    inv = topk_module.inverse_norms(bank[:200])
    assert isinstance(p, PreparedBank) and p.n_valid == 200
    assert torch.equal(p.inv_norms, inv)
    assert torch.equal(p.unit, (bank[:200] * inv[:, None]).to(torch.bfloat16))


def test_stale_or_foreign_prepared_bank_is_refused():
    bank = torch.randn(100, 8)
    q = torch.randn(16, 8)
    p = prepare_bank(bank)
    cosine_topk(q, bank, 2, prepared=p)  # fresh: accepted
    with pytest.raises(ValueError, match="prepared"):
        cosine_topk(q, bank.clone(), 2, prepared=p)
    with pytest.raises(ValueError, match="prepared"):
        cosine_topk(q, bank, 2, n_valid=50, prepared=p)
    bank[3] += 1  # in place: a new version
    with pytest.raises(ValueError, match="prepared"):
        cosine_topk(q, bank, 2, prepared=p)
    with pytest.raises(TypeError, match="prepared"):
        cosine_topk(q, bank, 2, prepared=(p.unit, p.inv_norms))


def test_prepare_bank_bad_input():
    with pytest.raises(TypeError, match="bank"):
        prepare_bank(torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_valid"):
        prepare_bank(torch.randn(10, 4), 11)
    bad = torch.randn(10, 4)
    bad[7, 1] = float("inf")
    with pytest.raises(ValueError, match="bank"):
        prepare_bank(bad)
    prepare_bank(bad, 7)  # the non-finite row is past n_valid: never read


def test_kernel_checks_its_arguments():
    q, bank = torch.randn(16, 8), torch.randn(40, 8)
    p = prepare_bank(bank)
    qu, rq = _unit(q)
    with pytest.raises(ValueError, match="bank_unit"):
        torch.ops.omnifm.cosine_topk_screened(q, bank, qu, rq, p.unit[:30], p.inv_norms, 2, 40, 0.01)
    with pytest.raises(ValueError, match="bound"):
        torch.ops.omnifm.cosine_topk_screened(q, bank, qu, rq, p.unit, p.inv_norms, 2, 40, -1.0)
    with pytest.raises(ValueError, match="query_unit"):
        torch.ops.omnifm.cosine_topk_screened(q, bank, qu.float(), rq, p.unit, p.inv_norms, 2, 40, 0.01)


# --- dispatch

@pytest.fixture
def screen_everywhere(monkeypatch):
    """Screen from the smallest size on any CPU (for the dispatch tests)."""
    monkeypatch.setattr(topk_module, "SCREEN_MIN_ROWS", {False: 1, True: 1})
    monkeypatch.setattr(topk_module, "SCREEN_MIN_QUERIES", {False: 16, True: 16})
    monkeypatch.setattr(topk_module, "cpu_has_fast_bfloat16", lambda: True)


def _dispatched_to_screen(*args, **kwargs):
    with mock.patch.object(topk_module, "_screened", wraps=topk_module._screened) as spy, forced("ext"):
        out = cosine_topk(*args, **kwargs)
    return spy.called, out


def test_dispatch_screens_large_float32_calls(screen_everywhere):
    q, bank = torch.randn(16, 32), torch.randn(300, 32)
    used, out = _dispatched_to_screen(q, bank, 3)
    assert used
    assert_bitwise(out, cosine_topk_ref(q, bank, 3), "dispatched")
    assert _dispatched_to_screen(q, bank, 3, prepared=prepare_bank(bank))[0]


@pytest.mark.parametrize("why", ["few queries", "float64", "no bf16 hardware", "small bank", "probe fails",
                                 "tiny bank row", "tiny query"])
def test_dispatch_keeps_float32_kernel(screen_everywhere, monkeypatch, why):
    q, bank = torch.randn(16, 32), torch.randn(300, 32)
    if why == "few queries":
        q = q[:15]
    elif why == "float64":
        q = q.double()
    elif why == "no bf16 hardware":
        monkeypatch.setattr(topk_module, "cpu_has_fast_bfloat16", lambda: False)
    elif why == "small bank":
        monkeypatch.setattr(topk_module, "SCREEN_MIN_ROWS", {False: 301, True: 301})
    elif why == "probe fails":
        monkeypatch.setattr(topk_module, "screen_matches_reference", lambda batch, d: False)
    elif why == "tiny bank row":  # outside the bound's premise: the screen declines
        bank[5] = 1e-17
        q[0] = bank[5] * 1e16
    else:
        q[3] = 1e-17
    original, answers = topk_module._screened, []
    monkeypatch.setattr(topk_module, "_screened", lambda *args: answers.append(original(*args)) or answers[-1])
    with forced("ext"):
        out = cosine_topk(q, bank, 3)
    assert all(a is None for a in answers)  # never called, or declined
    torch.testing.assert_close(out[0], cosine_topk_ref(q, bank, 3)[0].to(out[0].dtype))


def test_default_thresholds_screen_the_benchmark_shape_only_when_large():
    rows, queries = topk_module.SCREEN_MIN_ROWS, topk_module.SCREEN_MIN_QUERIES
    assert rows[True] <= rows[False] and queries[True] <= queries[False]
    assert queries[True] >= 16  # below, the BLAS orders dots differently (screen_matches_reference)
    assert rows[False] <= 200_000 and queries[False] <= 1024  # the README's retrieval shape is screened
