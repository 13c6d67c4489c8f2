"""KnowledgeBank: the server's store of global spectral prototypes.

Lifecycle per round (server side, in this order, deterministic):
1. record(): clients report how often they retrieved each entry of the bank they were
   sent; the per-round frequency (share of all retrievals) updates an EMA per entry;
2. prune(delta): entries whose EMA frequency is under delta are dropped once they
   have been offered for `grace` rounds; a guard keeps each contributing client's most
   retrieved entry, so a rare modality is not pruned away (a weakness the paper admits);
3. insert(): new uploads (a few prototypes per client: class means of its spectral
   tokens, never single images) replace that client's previous entries, which the
   tokenizer has since moved away from;
4. every entry is projected onto the ball ||s|| <= rho;
5. over capacity, the least-retrieved entries are evicted (ties: oldest first), the
   guard again keeping one entry per client while it can.
"""
import torch


class KnowledgeBank:
    def __init__(self, dim, *, capacity=256, rho=1.0, delta=0.0, ema=0.5, grace=2):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if not rho > 0:
            raise ValueError(f"rho: must be > 0, got {rho}")
        self.dim, self.capacity, self.rho, self.delta, self.ema, self.grace = dim, capacity, rho, delta, ema, grace
        self.entries = torch.zeros(0, dim)
        self.owners = torch.zeros(0, dtype=torch.int64)
        self.freq = torch.zeros(0)
        self.age = torch.zeros(0, dtype=torch.int64)  # rounds since insertion

    def __len__(self):
        return self.entries.shape[0]

    def _keep(self, mask):
        self.entries, self.owners, self.freq, self.age = (t[mask] for t in (self.entries, self.owners, self.freq, self.age))

    def _guarded(self):
        """Mask of each owner's most retrieved entry (lowest index on ties): two stable
        sorts (by frequency, descending, then by owner) put each owner's guarded entry
        first in its run; O(M log M), no loop over owners."""
        guard = torch.zeros(len(self), dtype=torch.bool)
        if len(self) == 0:
            return guard
        by_freq = torch.sort(self.freq, descending=True, stable=True).indices
        order = by_freq[torch.sort(self.owners[by_freq], stable=True).indices]
        owners = self.owners[order]
        first = torch.ones(len(self), dtype=torch.bool)
        first[1:] = owners[1:] != owners[:-1]
        guard[order[first]] = True
        return guard

    def record(self, counts):
        """counts: {client: int tensor (len(bank),)} retrievals of the broadcast bank."""
        if not counts or len(self) == 0:
            return
        total = torch.zeros(len(self))
        for c in counts.values():
            if c.shape != (len(self),):
                raise ValueError(f"counts: expected shape ({len(self)},), got {tuple(c.shape)}")
            total += c.float()
        if total.sum() > 0:
            self.freq = self.ema * self.freq + (1 - self.ema) * total / total.sum()

    def prune(self, delta=None):
        delta = self.delta if delta is None else delta
        low = (self.freq < delta) & (self.age >= self.grace)
        self._keep(~low | self._guarded())

    def insert(self, uploads):
        """uploads: {client: tensor (p, dim)}; replaces each client's previous entries.
        Every upload is checked before the bank changes; the new entries (in client
        order) start at the mean frequency of the entries no uploader replaces (0 if
        none), so they are neither favoured nor doomed."""
        clients = sorted(uploads)
        protos = [uploads[c].detach().float().cpu() for c in clients]
        for client, p in zip(clients, protos):
            if p.dim() != 2 or p.shape[1] != self.dim:
                raise ValueError(f"uploads: client {client} sent shape {tuple(p.shape)}, expected (p, {self.dim})")
            if not torch.isfinite(p).all():
                raise ValueError(f"uploads: client {client} sent non-finite prototypes")
        if not clients:
            return
        self._keep(~torch.isin(self.owners, torch.tensor(clients, dtype=torch.int64)))
        start = self.freq.mean() if len(self.freq) else torch.tensor(0.0)
        sizes = torch.tensor([p.shape[0] for p in protos], dtype=torch.int64)
        n = int(sizes.sum())
        self.entries = torch.cat([self.entries, *protos])
        self.owners = torch.cat([self.owners, torch.repeat_interleave(torch.tensor(clients, dtype=torch.int64), sizes)])
        self.freq = torch.cat([self.freq, start.expand(n)])
        self.age = torch.cat([self.age, torch.zeros(n, dtype=torch.int64)])
        self.project()
        self.evict()

    def seed(self, uploads):
        """Round 0: every client's upload."""
        self.insert(uploads)

    def project(self):
        norms = self.entries.norm(dim=1, keepdim=True)
        self.entries.mul_(torch.clamp(self.rho / norms.clamp_min(1e-12), max=1.0))  # in place: no second copy

    def evict(self):
        """Over capacity: least retrieved first, then oldest, then lowest index; guarded
        entries only when nothing else is left. One sort: dropping an unguarded entry
        never moves an owner's guard (its most retrieved entry stays), and once only
        guarded entries are left each is its owner's last, so the order is fixed."""
        excess = len(self) - self.capacity
        if excess <= 0:
            return
        guard = self._guarded()
        order = torch.arange(len(self))  # stable sorts from the last key to the first
        order = order[torch.sort(self.age[order], descending=True, stable=True).indices]
        order = order[torch.sort(self.freq[order], stable=True).indices]
        order = order[torch.sort(guard[order].to(torch.uint8), stable=True).indices]
        mask = torch.ones(len(self), dtype=torch.bool)
        mask[order[:excess]] = False
        self._keep(mask)

    def end_round(self):
        self.age += 1

    def state_dict(self):
        return {"entries": self.entries.clone(), "owners": self.owners.clone(), "freq": self.freq.clone(),
                "age": self.age.clone()}

    def load_state_dict(self, state):
        self.entries, self.owners, self.freq, self.age = (state[k].clone() for k in ("entries", "owners", "freq", "age"))
