"""Per-client train/test data for a federation scenario.

Scenarios (the paper's Table 1): "hard" = Dirichlet label skew gamma=0.1 over a pool
mixing every modality, "medium" = gamma=0.5, "extra" = one modality per client (its
own contrast, texture and channels; labels uniform). Each client's data is split
80/20 into train and a held-out test split for personalised evaluation.
"""
import torch

from . import synthetic
from ..fl.partition import dirichlet_label_skew, modality_per_client

SCENARIOS = {"hard": 0.1, "medium": 0.5, "extra": None}


def _split(x, y, seed, test_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = max(1, int(round(test_fraction * len(y))))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def synthetic_federation(n_clients, scenario, *, samples_per_client=120, image_size=32, n_classes=8, seed=0):
    """[(modality, train_x, train_y, test_x, test_y)] per client, and n_classes."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: expected one of {sorted(SCENARIOS)}, got {scenario!r}")
    out = []
    if scenario == "extra":
        for k, modality in enumerate(modality_per_client(n_clients, synthetic.MODALITIES)):
            x, y = synthetic.make_dataset(samples_per_client, modality, image_size=image_size, n_classes=n_classes,
                                          seed=seed * 1000 + k)
            out.append((modality, *_split(x, y, seed * 1000 + k)))
        return out, n_classes
    # A pool with every modality, then Dirichlet label skew across clients.
    per_mod = n_clients * samples_per_client // len(synthetic.MODALITIES) + 1
    xs, ys, ms = [], [], []
    for m, modality in enumerate(synthetic.MODALITIES):
        x, y = synthetic.make_dataset(per_mod, modality, image_size=image_size, n_classes=n_classes,
                                      seed=seed * 1000 + 500 + m)
        xs.append(x), ys.append(y), ms.append(torch.full_like(y, m))
    x, y, mods = torch.cat(xs), torch.cat(ys), torch.cat(ms)
    for k, idx in enumerate(dirichlet_label_skew(y.numpy(), n_clients, SCENARIOS[scenario], seed=seed, min_size=10)):
        idx = torch.from_numpy(idx)
        names = sorted({synthetic.MODALITIES[i] for i in mods[idx].tolist()})
        out.append(("+".join(names) if len(names) < 3 else "mixed", *_split(x[idx], y[idx], seed * 1000 + k)))
    return out, n_classes


def medmnist_federation(root, n_clients, scenario, *, seed=0, max_per_client=None):
    """The 24-class MedMNIST cross-modality set split among clients (train+test pooled
    from the official train/test files, then split per client 80/20)."""
    from .medmnist_npz import load_cross_modality

    x1, y1, m1, names = load_cross_modality(root, "train")
    x2, y2, m2, _ = load_cross_modality(root, "test")
    x, y, mods = torch.cat([x1, x2]), torch.cat([y1, y2]), torch.cat([m1, m2])
    n_classes = len(names)
    if scenario == "extra":
        n_mod = int(mods.max()) + 1
        parts = []
        for k in range(n_clients):  # clients that share a modality split its samples
            peers = list(range(k % n_mod, n_clients, n_mod))
            parts.append(torch.nonzero(mods == k % n_mod).flatten()[peers.index(k)::len(peers)])
    else:
        parts = [torch.from_numpy(p) for p in
                 dirichlet_label_skew(y.numpy(), n_clients, SCENARIOS[scenario], seed=seed, min_size=10)]
    out = []
    for k, idx in enumerate(parts):
        if max_per_client:
            idx = idx[:max_per_client]
        out.append((f"medmnist-{k}", *_split(x[idx], y[idx], seed * 1000 + k)))
    return out, n_classes
