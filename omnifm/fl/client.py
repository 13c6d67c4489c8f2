"""Client: one hospital's data and persistent state, and the local SGD loop.

The simulation keeps one model object and loads each client's state into it in turn:
a client is its data (two `torch.utils.data` datasets of `(input, target)` items)
plus `local_state` (every tensor its strategy keeps private or local: private
parameters and, FedBN-style, BatchNorm running statistics) plus `extra` (strategy
state such as SCAFFOLD's control variate or Ditto's personal model).
"""
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate


def tensor_bytes(obj):
    """Bytes of the tensors in obj (a tensor, or dicts of them; anything else counts 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


@dataclass
class Update:
    """What a client sends back after a round."""
    client: int
    n_samples: int
    weights: dict  # shared tensors after local training
    loss: float
    extra: dict = field(default_factory=dict)  # strategy payload (e.g. SCAFFOLD delta c)
    bank_upload: torch.Tensor | None = None  # prototypes (p, d) for the knowledge bank
    retrieval_counts: torch.Tensor | None = None
    contributors: int = 1  # clients it stands for (a secure aggregate: all the round's participants)


@dataclass
class Client:
    cid: int
    train: Dataset
    test: Dataset
    local_state: dict
    name: str = ""  # its modality or institution, for reports
    extra: dict = field(default_factory=dict)

    @property
    def n_train(self):
        return len(self.train)

    def batches(self, epochs, batch_size, seed):
        """Shuffled mini-batches, a deterministic function of seed (resume-safe)."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(self.n_train, generator=g)
            for i in range(0, self.n_train, batch_size):
                yield fetch(self.train, perm[i:i + batch_size])


def fetch(dataset, idx):
    """Items idx (int64 tensor) of dataset as one batch: whole-tensor indexing for an
    in-memory TensorDataset or a dataset with its own `fetch_batch(idx)` (what default_collate
    would make of its items, in one indexing per field), else item by item (files)
    through default_collate."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    if hasattr(dataset, "fetch_batch"):
        return dataset.fetch_batch(idx)
    return default_collate([dataset[i] for i in idx.tolist()])


def in_order(dataset, batch_size=256):
    """The whole dataset in order, in batches (evaluation, BN statistics, prototypes)."""
    for i in range(0, len(dataset), batch_size):
        yield fetch(dataset, torch.arange(i, min(i + batch_size, len(dataset))))


@torch.no_grad()
def recalibrate_bn(model, dataset, batch_size=256):
    """Re-estimate BatchNorm running statistics on `dataset` (the client's own training
    data) for the weights now loaded: with BN statistics kept local and partial
    participation, a client's stored statistics belong to older weights."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    for x, _ in in_order(dataset, batch_size):
        model(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom


def load_state(model, global_state, local_state):
    """Install shared + local tensors; together they must cover the whole state dict."""
    model.load_state_dict({**global_state, **local_state}, strict=True)


def split_state(model, is_shared):
    """(shared, local) copies of the model's state dict."""
    shared, local = {}, {}
    for name, t in model.state_dict().items():
        (shared if is_shared(name) else local)[name] = t.detach().clone()
    return shared, local


def trainable(model):
    """The parameters local training optimises: those with requires_grad (a task may
    freeze part of its model, e.g. a pretrained encoder under LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


class ClientTimeout(TimeoutError):
    """Local training ran past the round's client_timeout (the client is skipped)."""


def sgd(model, client, *, params, epochs, batch_size, lr, seed, loss_of, before_step=None, deadline=None):
    """Local SGD (momentum 0.9, weight decay 5e-4) on `params`; returns (mean loss, steps).

    loss_of(x, y) -> scalar loss; before_step() may edit gradients (SCAFFOLD). deadline:
    a time.monotonic() value; checked after every step, ClientTimeout past it (a slow
    client is cut off between steps; the simulation reloads the model for the next one).
    """
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    total, steps = 0.0, 0
    for x, y in client.batches(epochs, batch_size, seed):
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        total += loss.item()
        steps += 1
        if deadline is not None and time.monotonic() > deadline:
            raise ClientTimeout(f"client {client.cid}: local training passed its time limit after {steps} steps")
    return total / max(steps, 1), steps
