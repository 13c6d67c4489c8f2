import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.fl import KnowledgeBank


@st.composite
def histories(draw):
    """A random sequence of bank operations with random uploads and counts."""
    dim = draw(st.integers(1, 6))
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        clients = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True))
        uploads = {c: draw(st.integers(1, 5)) for c in clients}
        ops.append((uploads, draw(st.integers(0, 2**31 - 1))))
    return dim, draw(st.integers(1, 12)), draw(st.floats(0.1, 3.0)), draw(st.floats(0.0, 0.5)), ops


def replay(dim, capacity, rho, delta, ops):
    bank = KnowledgeBank(dim, capacity=capacity, rho=rho, delta=delta, grace=1)
    for uploads, seed in ops:
        g = torch.Generator().manual_seed(seed)
        if len(bank):
            counts = {c: torch.randint(0, 5, (len(bank),), generator=g) for c in uploads}
            bank.record(counts)
            bank.prune()
        bank.insert({c: torch.randn(n, dim, generator=g) * 3 for c, n in uploads.items()})
        bank.end_round()
        yield bank, set(uploads)


@given(histories())
@settings(max_examples=60)
def test_bank_invariants(h):
    dim, capacity, rho, delta, ops = h
    seen = set()
    for bank, uploaded in replay(dim, capacity, rho, delta, ops):
        seen |= uploaded
        assert len(bank) <= capacity
        assert (bank.entries.norm(dim=1) <= rho * (1 + 1e-6)).all()
        assert bank.entries.shape == (len(bank), dim) and bank.owners.shape == bank.freq.shape == (len(bank),)
        # Guard: every client that uploaded keeps an entry while the capacity allows one each.
        owners = set(bank.owners.tolist())
        if len(seen) <= capacity:
            assert owners == seen, (owners, seen)


@given(histories())
@settings(max_examples=20)
def test_bank_is_deterministic(h):
    a = [b.state_dict() for b, _ in replay(*h[:4], h[4])]
    b = [b.state_dict() for b, _ in replay(*h[:4], h[4])]
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_upload_replaces_own_entries_and_prune_spares_the_guard():
    bank = KnowledgeBank(2, capacity=10, delta=0.3, grace=0)
    bank.seed({0: torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1: torch.tensor([[1.0, 1.0]])})
    assert bank.owners.tolist() == [0, 0, 1]
    bank.insert({0: torch.tensor([[2.0, 0.0]])})
    assert bank.owners.tolist() == [1, 0] and torch.allclose(bank.entries[1], torch.tensor([1.0, 0.0]))  # projected
    bank.record({0: torch.tensor([0, 9]), 1: torch.tensor([0, 1])})
    bank.prune()  # client 1's only entry is never retrieved but stays: the guard
    assert sorted(bank.owners.tolist()) == [0, 1]


def test_rejects_bad_uploads():
    import pytest

    bank = KnowledgeBank(3)
    with pytest.raises(ValueError, match="uploads"):
        bank.insert({0: torch.randn(2, 4)})
    with pytest.raises(ValueError, match="uploads"):
        bank.insert({0: torch.tensor([[float("nan"), 0.0, 0.0]])})
    assert len(bank) == 0
