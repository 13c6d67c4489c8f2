"""Partitioners: Dirichlet label skew, one modality per client, participation."""
import numpy as np


def dirichlet_label_skew(labels, n_clients, gamma, *, seed=0, min_size=2):
    """Split sample indices among clients with label proportions ~ Dirichlet(gamma).

    Smaller gamma -> more skew (gamma=0.1 is the paper's hard scenario, 0.5 medium).
    Redraws (deterministically) until every client holds at least min_size samples.
    Returns a list of sorted int64 index arrays.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients: must be >= 1, got {n_clients}")
    if not gamma > 0:
        raise ValueError(f"gamma: must be > 0, got {gamma}")
    labels = np.asarray(labels)
    if len(labels) < n_clients * min_size:
        raise ValueError(f"labels: {len(labels)} samples cannot give {n_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts = [[] for _ in range(n_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_clients, gamma))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RuntimeError("dirichlet_label_skew: could not satisfy min_size; lower min_size or raise gamma")


def modality_per_client(n_clients, modalities):
    """Client k sees modality k mod len(modalities) only (the 'extra' scenario)."""
    return [modalities[k % len(modalities)] for k in range(n_clients)]


def sample_participants(n_clients, ratio, round_idx, *, seed=0):
    """Clients taking part in a round: max(1, round(ratio * n)) of them, sorted, a
    deterministic function of (seed, round) so a resumed run draws the same ones."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
    m = max(1, int(round(ratio * n_clients)))
    rng = np.random.default_rng([seed, round_idx, 7919])
    return sorted(rng.choice(n_clients, size=m, replace=False).tolist())
