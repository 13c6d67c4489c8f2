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
        """Mask of each owner's most retrieved entry (lowest index on ties)."""
        guard = torch.zeros(len(self), dtype=torch.bool)
        for owner in self.owners.unique().tolist():
            idx = (self.owners == owner).nonzero().flatten()
            guard[idx[torch.argmax(self.freq[idx])]] = True
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
        """uploads: {client: tensor (p, dim)}; replaces each client's previous entries."""
        for client in sorted(uploads):
            protos = uploads[client].detach().float().cpu()
            if protos.dim() != 2 or protos.shape[1] != self.dim:
                raise ValueError(f"uploads: client {client} sent shape {tuple(protos.shape)}, expected (p, {self.dim})")
            if not torch.isfinite(protos).all():
                raise ValueError(f"uploads: client {client} sent non-finite prototypes")
            self._keep(self.owners != client)
            n = protos.shape[0]
            self.entries = torch.cat([self.entries, protos])
            self.owners = torch.cat([self.owners, torch.full((n,), client, dtype=torch.int64)])
            # New entries start at the mean frequency, so they are neither favoured nor doomed.
            start = self.freq.mean() if len(self.freq) else torch.tensor(0.0)
            self.freq = torch.cat([self.freq, start.expand(n)])
            self.age = torch.cat([self.age, torch.zeros(n, dtype=torch.int64)])
        self.project()
        self.evict()

    def seed(self, uploads):
        """Round 0: every client's upload."""
        self.insert(uploads)

    def project(self):
        norms = self.entries.norm(dim=1, keepdim=True)
        self.entries = self.entries * torch.clamp(self.rho / norms.clamp_min(1e-12), max=1.0)

    def evict(self):
        while len(self) > self.capacity:
            guard = self._guarded()
            # Least retrieved first, then oldest; guarded entries only if nothing else is left.
            order = sorted(range(len(self)), key=lambda i: (bool(guard[i]), float(self.freq[i]), -int(self.age[i]), i))
            mask = torch.ones(len(self), dtype=torch.bool)
            mask[order[0]] = False
            self._keep(mask)

    def end_round(self):
        self.age += 1

    def state_dict(self):
        return {"entries": self.entries.clone(), "owners": self.owners.clone(), "freq": self.freq.clone(),
                "age": self.age.clone()}

    def load_state_dict(self, state):
        self.entries, self.owners, self.freq, self.age = (state[k].clone() for k in ("entries", "owners", "freq", "age"))
