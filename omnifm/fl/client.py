"""Client: one hospital's data and persistent state, and the local SGD loop.

The simulation keeps one model object and loads each client's state into it in turn:
a client is its data plus `local_state` (every tensor its strategy keeps private or
local: private parameters and, FedBN-style, BatchNorm running statistics) plus
`extra` (strategy state such as SCAFFOLD's control variate or Ditto's personal model).
"""
from dataclasses import dataclass, field

import torch


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


@dataclass
class Client:
    cid: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    local_state: dict
    modality: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_train(self):
        return len(self.train_y)

    def batches(self, epochs, batch_size, seed):
        """Shuffled mini-batches, a deterministic function of seed (resume-safe)."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(self.n_train, generator=g)
            for i in range(0, self.n_train, batch_size):
                idx = perm[i:i + batch_size]
                yield self.train_x[idx], self.train_y[idx]


def load_state(model, global_state, local_state):
    """Install shared + local tensors; together they must cover the whole state dict."""
    model.load_state_dict({**global_state, **local_state}, strict=True)


def split_state(model, is_shared):
    """(shared, local) copies of the model's state dict."""
    shared, local = {}, {}
    for name, t in model.state_dict().items():
        (shared if is_shared(name) else local)[name] = t.detach().clone()
    return shared, local


def sgd(model, client, *, params, epochs, batch_size, lr, seed, loss_of, before_step=None):
    """Local SGD (momentum 0.9, weight decay 5e-4) on `params`; returns (mean loss, steps).

    loss_of(x, y) -> scalar loss; before_step() may edit gradients (SCAFFOLD).
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
    return total / max(steps, 1), steps
