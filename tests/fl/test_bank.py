"""KnowledgeBank: a multi-round scenario computed by hand step by step, focused tests of
each rule (EMA of normalised counts, grace, guard, eviction order and ties, projection,
start frequency), and invariants and order-independence on random histories."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.fl import KnowledgeBank


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def counts(*c):
    return torch.tensor(c, dtype=torch.int64)


def check(bank, entries, owners, freq, age):
    assert bank.owners.tolist() == owners
    assert bank.age.tolist() == age
    assert bank.freq.tolist() == pytest.approx(freq, abs=1e-6)
    assert torch.allclose(bank.entries, t(entries), atol=1e-6), bank.entries
    assert bank.freq.dtype == torch.float32 and bank.entries.dtype == torch.float32


def test_scenario_by_hand():
    """Three rounds in the simulation's order (record, prune, insert, end_round); every
    entry, owner, frequency and age checked after each step."""
    bank = KnowledgeBank(2, capacity=5, rho=1.0, delta=0.2, ema=0.5, grace=2)
    # Round 0 seeding. [3, 4] is projected onto the unit ball; shorter entries are unchanged.
    bank.seed({1: t([[0.25, 0]]), 0: t([[3, 4], [0.5, 0], [0, 0.5]])})  # inserted in client order
    p, q, r, u = [0.6, 0.8], [0.5, 0], [0, 0.5], [0.25, 0]
    check(bank, [p, q, r, u], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0])
    bank.end_round()
    check(bank, [p, q, r, u], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1])

    # Round 1. Retrievals [4, 2, 2, 0] of 8: freq = 0.5 * 0 + 0.5 * share.
    bank.record({0: counts(3, 2, 1, 0), 1: counts(1, 0, 1, 0)})
    check(bank, [p, q, r, u], [0, 0, 0, 1], [0.25, 0.125, 0.125, 0], [1, 1, 1, 1])
    bank.prune()  # q, r and u are under delta but only 1 round old (grace 2): all stay
    check(bank, [p, q, r, u], [0, 0, 0, 1], [0.25, 0.125, 0.125, 0], [1, 1, 1, 1])
    # Client 2's two prototypes start at the mean frequency 0.5 / 4 = 0.125. Six entries
    # for five places: the guard keeps p (client 0's most retrieved), u (client 1's only)
    # and s (client 2's first at a tie); q, r, t tie at 0.125, q and r are older, q has
    # the lower index: q goes.
    s_, t_ = [0, 0.3], [0.3, 0]
    bank.insert({2: t([s_, t_])})
    check(bank, [p, r, u, s_, t_], [0, 0, 1, 2, 2], [0.25, 0.125, 0, 0.125, 0.125], [1, 1, 1, 0, 0])
    bank.end_round()
    check(bank, [p, r, u, s_, t_], [0, 0, 1, 2, 2], [0.25, 0.125, 0, 0.125, 0.125], [2, 2, 2, 1, 1])

    # Round 2. Retrievals [2, 0, 1, 3, 0] of 6.
    bank.record({2: counts(1, 0, 0, 1, 0), 1: counts(1, 0, 1, 2, 0)})
    f = [0.125 + 2 / 12, 0.0625, 1 / 12, 0.0625 + 3 / 12, 0.0625]
    check(bank, [p, r, u, s_, t_], [0, 0, 1, 2, 2], f, [2, 2, 2, 1, 1])
    # Under delta: r, u (age 2) and t (age 1, in its grace). u is client 1's guarded
    # entry, so only r goes.
    bank.prune()
    f = [f[0], f[2], f[3], f[4]]
    check(bank, [p, u, s_, t_], [0, 1, 2, 2], f, [2, 2, 1, 1])
    # Client 0 replaces p with v; mean of the other three = (1/12 + 5/16 + 1/16) / 3 = 11/72,
    # which client 3's two entries also get (adding entries at the mean keeps it). Six for
    # five: guarded u, s, v, w (client 3's first at a tie); of t (0.0625) and x (11/72) the
    # least retrieved, t, goes.
    v, w, x = [0.6, 0], [0, -0.4], [0.8, 0.6]
    bank.insert({3: t([w, [1.6, 1.2]]), 0: t([v])})
    check(bank, [u, s_, v, w, x], [1, 2, 0, 3, 3], [1 / 12, 0.0625 + 0.25, 11 / 72, 11 / 72, 11 / 72], [2, 1, 0, 0, 0])
    bank.end_round()
    assert bank.age.tolist() == [3, 2, 1, 1, 1]


def test_record_is_an_ema_of_normalised_counts():
    bank = KnowledgeBank(1, ema=0.25, grace=0)
    bank.seed({0: t([[0.1], [0.2], [0.3]])})
    freq = [0.0, 0.0, 0.0]
    for c in ([[1, 0, 3]], [[0, 2, 0], [0, 0, 2]], [[5, 5, 0]]):
        total = [sum(col) for col in zip(*c)]
        freq = [0.25 * f + 0.75 * n / sum(total) for f, n in zip(freq, total)]
        bank.record({i: counts(*row) for i, row in enumerate(c)})
        assert bank.freq.tolist() == pytest.approx(freq, abs=1e-6)
    bank.record({0: counts(0, 0, 0)})  # no retrievals at all: no information, no change
    bank.record({})
    assert bank.freq.tolist() == pytest.approx(freq, abs=1e-6)
    with pytest.raises(ValueError, match="counts"):
        bank.record({0: counts(1, 2)})


@pytest.mark.parametrize("age,pruned", [(2, False), (3, True), (4, True)])
def test_grace_boundary(age, pruned):
    bank = KnowledgeBank(1, delta=0.5, grace=3)
    bank.seed({0: t([[0.1], [0.2]])})
    for _ in range(age):
        bank.end_round()
    bank.record({0: counts(9, 1)})  # entry 1: freq 0.05 < delta
    bank.prune()
    assert len(bank) == (1 if pruned else 2)


def test_prune_guard_keeps_each_owners_most_retrieved():
    bank = KnowledgeBank(1, delta=0.9, grace=0)
    bank.seed({0: t([[0.1], [0.2], [0.3]]), 1: t([[0.4], [0.5]]), 2: t([[0.6]])})
    bank.record({0: counts(1, 3, 1, 2, 2, 1)})  # every entry is under delta
    bank.prune()
    # Client 0 keeps its most retrieved (index 1), client 1 its first at a tie, client 2 its only one.
    assert bank.owners.tolist() == [0, 1, 2]
    assert bank.entries.flatten().tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert bank.freq.tolist() == pytest.approx([0.5 * 3 / 10, 0.5 * 2 / 10, 0.5 * 1 / 10])


def test_prune_uses_the_configured_delta_unless_given():
    bank = KnowledgeBank(1, delta=0.3, grace=0)
    bank.seed({0: t([[0.1], [0.2]])})
    bank.record({0: counts(3, 1)})  # freq [0.375, 0.125]
    bank.prune(delta=0.1)
    assert len(bank) == 2
    bank.prune()
    assert bank.entries.flatten().tolist() == pytest.approx([0.1])


def test_eviction_order_least_retrieved_first_guarded_last():
    bank = KnowledgeBank(1, capacity=6, grace=99)
    bank.seed({0: t([[0.1], [0.2], [0.3]]), 1: t([[0.4], [0.5], [0.6]])})
    bank.record({0: counts(8, 4, 2, 8, 2, 1)})  # freq [8, 4, 2, 8, 2, 1] / 50
    # Client 2's entry starts at the mean 1/12; seven for six: 0.6 (1/50) goes.
    bank.insert({2: t([[0.7]])})
    assert bank.entries.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.7])
    # 0.3 and 0.5 tie at 2/50 with equal ages: the lower index goes.
    bank.capacity = 5
    bank.evict()
    assert bank.entries.flatten().tolist() == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.7])
    bank.capacity = 3  # 0.5 (2/50), then 0.2 (4/50); 0.1, 0.4, 0.7 are guarded
    bank.evict()
    assert bank.entries.flatten().tolist() == pytest.approx([0.1, 0.4, 0.7])
    # Only guarded entries left: the least retrieved (0.7 at 1/12) goes, then of 0.1 and
    # 0.4 (8/50, same age) the lower index.
    bank.capacity = 1
    bank.evict()
    assert bank.entries.flatten().tolist() == pytest.approx([0.4])


def test_eviction_ties_go_to_the_oldest():
    bank = KnowledgeBank(1, capacity=4, grace=99)
    bank.seed({0: t([[0.1], [0.2]])})
    bank.end_round()
    bank.insert({1: t([[0.3], [0.4]])})  # all four at frequency 0; ages [1, 1, 0, 0]
    bank.insert({2: t([[0.5]])})  # five for four: of the unguarded 0.2 (age 1) and 0.4 (age 0), 0.2 goes
    assert bank.entries.flatten().tolist() == pytest.approx([0.1, 0.3, 0.4, 0.5])


def test_new_entries_start_at_the_mean_frequency():
    bank = KnowledgeBank(1, capacity=10)
    bank.seed({0: t([[0.1], [0.2]]), 1: t([[0.3]])})
    bank.record({0: counts(6, 2, 0)})  # freq [0.375, 0.125, 0]
    bank.insert({0: t([[0.4]]), 2: t([[0.5], [0.6]])})
    # Client 0's old entries go before the mean is taken: its new one starts at mean([0]),
    # client 2's then at mean([0, 0]).
    assert bank.owners.tolist() == [1, 0, 2, 2] and bank.freq.tolist() == [0, 0, 0, 0]
    bank.record({1: counts(1, 1, 1, 1)})
    bank.insert({3: t([[0.7]])})
    assert bank.freq.tolist() == pytest.approx([0.125] * 5)


def test_new_entries_start_at_the_mean_of_the_entries_no_uploader_replaces():
    bank = KnowledgeBank(1, capacity=10, ema=0.5)
    bank.seed({0: t([[0.1]]), 1: t([[0.2]]), 2: t([[0.3]])})
    bank.record({0: counts(6, 3, 1)})  # freq 0.5 * [0.6, 0.3, 0.1]
    bank.insert({1: t([[0.5]]), 0: t([[0.4]])})
    # clients 0 and 1 replace theirs; client 2's 0.05 is the mean of what stays, for both
    assert bank.owners.tolist() == [2, 0, 1] and bank.freq.tolist() == pytest.approx([0.05, 0.05, 0.05])


def guarded_one_owner_at_a_time(bank):
    """The guard's definition, owner by owner (the oracle of the sorted version)."""
    guard = torch.zeros(len(bank), dtype=torch.bool)
    for owner in bank.owners.unique().tolist():
        idx = (bank.owners == owner).nonzero().flatten()
        guard[idx[torch.argmax(bank.freq[idx])]] = True
    return guard


def evict_one_at_a_time(bank):
    """Eviction's definition: drop the first of (guarded, freq, -age, index), recompute, repeat."""
    while len(bank) > bank.capacity:
        guard = guarded_one_owner_at_a_time(bank)
        order = sorted(range(len(bank)), key=lambda i: (bool(guard[i]), float(bank.freq[i]), -int(bank.age[i]), i))
        mask = torch.ones(len(bank), dtype=torch.bool)
        mask[order[0]] = False
        bank._keep(mask)


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 6), st.integers(0, 45))
@settings(max_examples=80)
def test_sorted_guard_and_eviction_match_their_definitions(seed, n, owners, capacity):
    """Many ties (frequencies and ages from small sets) so every tie-break is exercised."""
    banks = []
    for _ in range(2):
        bank = KnowledgeBank(1, capacity=max(capacity, 1))
        bank.entries = torch.arange(n, dtype=torch.float32)[:, None]
        bank.owners = torch.randint(0, owners, (n,), generator=torch.Generator().manual_seed(seed))
        bank.freq = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 1)).float() / 4
        bank.age = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 2))
        banks.append(bank)
    assert torch.equal(banks[0]._guarded(), guarded_one_owner_at_a_time(banks[0]))
    banks[0].evict()
    evict_one_at_a_time(banks[1])
    assert all(torch.equal(banks[0].state_dict()[k], banks[1].state_dict()[k]) for k in banks[0].state_dict())


@given(st.integers(0, 2**31 - 1), st.floats(0.1, 3.0), st.integers(1, 4))
@settings(max_examples=30)
def test_projection_clamps_onto_the_ball(seed, rho, dim):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, dim, generator=g) * torch.tensor([0.01, 0.3, 0.9, 1.5, 4.0, 30.0])[:, None]
    bank = KnowledgeBank(dim, rho=rho)
    bank.insert({0: x})
    norms = x.double().norm(dim=1, keepdim=True)
    want = torch.where(norms > rho, x.double() * rho / norms, x.double())  # only long entries shrink
    torch.testing.assert_close(bank.entries.double(), want, rtol=1e-6, atol=1e-7)


# -- random histories ---------------------------------------------------------------
@st.composite
def histories(draw):
    """A random sequence of rounds: who uploads how many prototypes, and a seed for the
    uploads and retrieval counts."""
    dim = draw(st.integers(1, 6))
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        clients = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True))
        uploads = {c: draw(st.integers(1, 5)) for c in clients}
        ops.append((uploads, draw(st.integers(0, 2**31 - 1))))
    return dim, draw(st.integers(1, 12)), draw(st.floats(0.1, 3.0)), draw(st.floats(0.0, 0.5)), ops


def replay(dim, capacity, rho, delta, ops, reverse=False):
    """The simulation's per-round order; `reverse` hands the bank each round's reports in
    the opposite client order."""
    bank = KnowledgeBank(dim, capacity=capacity, rho=rho, delta=delta, grace=1)
    for uploads, seed in ops:
        g = torch.Generator().manual_seed(seed)
        order = sorted(uploads, reverse=reverse)
        if len(bank):
            c = {k: torch.randint(0, 5, (len(bank),), generator=torch.Generator().manual_seed(seed + k)) for k in order}
            bank.record(c)
            bank.prune()
        protos = {k: torch.randn(uploads[k], dim, generator=g) * 3 for k in sorted(uploads)}
        bank.insert({k: protos[k] for k in order})
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
        assert (bank.freq >= 0).all() and (bank.freq <= 1 + 1e-6).all()  # an EMA of shares
        # Guard: every client that uploaded keeps an entry while the capacity allows one each.
        if len(seen) <= capacity:
            assert set(bank.owners.tolist()) == seen


@given(histories())
@settings(max_examples=20)
def test_bank_state_does_not_depend_on_report_order(h):
    """Clients report in whatever order they finish: the bank must come out bit-identical."""
    for a, b in zip(replay(*h[:4], h[4]), replay(*h[:4], h[4], reverse=True)):
        x, y = a[0].state_dict(), b[0].state_dict()
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_state_dict_round_trip():
    bank = KnowledgeBank(2, capacity=3)
    bank.seed({0: t([[1, 0], [0, 1]]), 1: t([[0.5, 0.5]])})
    bank.record({0: counts(1, 2, 3)})
    bank.end_round()
    other = KnowledgeBank(2, capacity=3)
    other.load_state_dict(bank.state_dict())
    for b in (bank, other):
        b.record({1: counts(0, 1, 1)})
        b.insert({2: t([[0.2, 0.1]])})
    assert all(torch.equal(bank.state_dict()[k], other.state_dict()[k]) for k in bank.state_dict())


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        KnowledgeBank(3, capacity=0)
    with pytest.raises(ValueError, match="rho"):
        KnowledgeBank(3, rho=0.0)
    bank = KnowledgeBank(3)
    with pytest.raises(ValueError, match="uploads"):
        bank.insert({0: torch.randn(2, 4, generator=torch.Generator().manual_seed(0))})
    with pytest.raises(ValueError, match="uploads"):
        bank.insert({0: torch.tensor([[float("nan"), 0.0, 0.0]])})
    assert len(bank) == 0
    with pytest.raises(ValueError, match="uploads: client 1"):  # checked before any upload goes in
        bank.insert({0: torch.ones(1, 3), 1: torch.ones(1, 4)})
    assert len(bank) == 0
