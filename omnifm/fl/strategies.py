"""Federated strategies, one small class each.

A strategy decides three things: which tensors are shared (`is_shared`, the parameter
policy), the client's local objective (`client_train`), and the server's aggregation
(`aggregate`). Shared by default: every trainable parameter; BatchNorm running
statistics stay local (FedBN-style) unless `share_bn_stats`; frozen parameters
(requires_grad False when the model is built, named in `frozen`) are neither trained
nor sent, so they stay in each client's local state. Evaluation is personalised: each
client's model is the global shared state plus its own local state (Ditto: its
personal model).
"""
import copy

import torch
import torch.nn.functional as F

from .client import Update, in_order, load_state, sgd, split_state, trainable

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def weighted_mean(updates, key):
    n = sum(u.n_samples for u in updates)
    return sum(u.weights[key].double() * (u.n_samples / n) for u in updates).to(updates[0].weights[key].dtype)


def _sq_dist(model, ref):
    """sum ||w - ref||^2 over the parameters named in ref."""
    params = dict(model.named_parameters())
    return sum(((params[k] - v) ** 2).sum() for k, v in ref.items() if k in params)


class Strategy:
    name = "base"
    private_prefixes = ()  # parameter-name prefixes that stay on the client
    uses_bank = False

    def __init__(self, *, share_bn_stats=False, frozen=(), **hp):
        self.share_bn_stats = share_bn_stats
        self.frozen = frozenset(frozen)
        self.hp = hp

    # -- parameter policy ---------------------------------------------------
    def is_shared(self, name):
        if name in self.frozen:
            return False
        if not self.share_bn_stats and name.rsplit(".", 1)[-1] in BN_STATS:
            return False
        return not any(name.startswith(p) for p in self.private_prefixes)

    # -- client side --------------------------------------------------------
    def objective(self, client, model, ctx, global_state):
        """loss_of(x, y) for the local SGD loop."""
        return lambda x, y: ctx.loss_fn(model(x), y)

    def client_train(self, client, model, global_state, ctx):
        load_state(model, global_state, client.local_state)
        loss, steps = sgd(model, client, params=trainable(model), epochs=ctx.epochs,
                          batch_size=ctx.batch_size, lr=ctx.lr, seed=ctx.seed,
                          loss_of=self.objective(client, model, ctx, global_state),
                          before_step=self.before_step(client, model, global_state), deadline=ctx.deadline)
        return self.finish(client, model, global_state, ctx, loss, steps)

    def before_step(self, client, model, global_state):
        return None

    def finish(self, client, model, global_state, ctx, loss, steps, extra=None):
        shared, local = split_state(model, self.is_shared)
        client.local_state = local
        return Update(client.cid, client.n_train, shared, loss, extra or {})

    def eval_state(self, client, global_state):
        return global_state, client.local_state

    # -- server side --------------------------------------------------------
    def aggregate(self, global_state, updates, n_clients):
        return {k: weighted_mean(updates, k) for k in global_state}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class FedAvg(Strategy):
    name = "fedavg"


class Local(Strategy):
    """No communication: every client trains its own model."""
    name = "local"

    def is_shared(self, name):
        return False

    def aggregate(self, global_state, updates, n_clients):
        return global_state


class FedProx(Strategy):
    name = "fedprox"

    def objective(self, client, model, ctx, global_state):
        mu = self.hp.get("mu", 0.01)
        ref = {k: v for k, v in global_state.items() if v.is_floating_point()}
        return lambda x, y: ctx.loss_fn(model(x), y) + mu / 2 * _sq_dist(model, ref)


class FedPer(Strategy):
    """Shared body, private head."""
    name = "fedper"

    def __init__(self, *, head_prefix, **kw):
        super().__init__(**kw)
        self.private_prefixes = (head_prefix,)


class FedRep(FedPer):
    """Private head trained first with the body frozen, then the body with the head frozen."""
    name = "fedrep"

    def client_train(self, client, model, global_state, ctx):
        load_state(model, global_state, client.local_state)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen ones stay frozen
        head = [p for n, p in params if n.startswith(self.private_prefixes)]
        body = [p for n, p in params if not n.startswith(self.private_prefixes)]
        loss_of = self.objective(client, model, ctx, global_state)
        for frozen, trained, epochs in ((body, head, self.hp.get("head_epochs", 2)), (head, body, ctx.epochs)):
            for p in frozen:
                p.requires_grad_(False)
            try:
                loss, steps = sgd(model, client, params=trained, epochs=epochs, batch_size=ctx.batch_size, lr=ctx.lr,
                                  seed=ctx.seed + epochs, loss_of=loss_of, deadline=ctx.deadline)
            finally:  # the model object is shared by every client: never leave it frozen
                for p in frozen:
                    p.requires_grad_(True)
        return self.finish(client, model, global_state, ctx, loss, steps)


class _ServerOptimizer(FedAvg):
    """FedAvgM / FedAdam / FedYogi: a server optimizer on the pseudo-gradient
    delta = mean(client weights) - global (Reddi et al., Adaptive Federated Optimization)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.m, self.v = {}, {}

    def aggregate(self, global_state, updates, n_clients):
        out = {}
        for k, w in global_state.items():
            avg = weighted_mean(updates, k)
            if not w.is_floating_point():
                out[k] = avg
                continue
            delta = avg - w
            out[k] = w + self.step(k, delta)
        return out

    def state_dict(self):
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.m, self.v = dict(state["m"]), dict(state["v"])


class FedAvgM(_ServerOptimizer):
    name = "fedavgm"

    def step(self, k, delta):
        beta, lr = self.hp.get("server_momentum", 0.9), self.hp.get("server_lr", 1.0)
        self.m[k] = beta * self.m.get(k, torch.zeros_like(delta)) + delta
        return lr * self.m[k]


class FedAdam(_ServerOptimizer):
    name = "fedadam"

    def second_moment(self, v, d2, beta2):
        return beta2 * v + (1 - beta2) * d2

    def step(self, k, delta):
        b1, b2 = self.hp.get("beta1", 0.9), self.hp.get("beta2", 0.99)
        lr, tau = self.hp.get("server_lr", 0.01), self.hp.get("tau", 1e-3)
        self.m[k] = b1 * self.m.get(k, torch.zeros_like(delta)) + (1 - b1) * delta
        self.v[k] = self.second_moment(self.v.get(k, torch.full_like(delta, tau ** 2)), delta ** 2, b2)
        return lr * self.m[k] / (self.v[k].sqrt() + tau)


class FedYogi(FedAdam):
    name = "fedyogi"

    def second_moment(self, v, d2, beta2):
        return v - (1 - beta2) * d2 * torch.sign(v - d2)


class FedDyn(FedAvg):
    """Acar et al.: local loss - <g_i, w> + alpha/2 ||w - w_g||^2; g_i -= alpha (w_i - w_g);
    server h -= alpha/N sum(w_i - w_g), global = mean(w_i) - h / alpha."""
    name = "feddyn"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.h = {}

    def objective(self, client, model, ctx, global_state):
        alpha = self.hp.get("alpha", 0.01)
        ref = {k: v for k, v in global_state.items() if v.is_floating_point()}
        g = client.extra.setdefault("dyn_grad", {k: torch.zeros_like(v) for k, v in ref.items()})
        params = dict(model.named_parameters())

        def loss_of(x, y):
            linear = sum((params[k] * g[k]).sum() for k in ref if k in params)
            return ctx.loss_fn(model(x), y) - linear + alpha / 2 * _sq_dist(model, ref)
        return loss_of

    def finish(self, client, model, global_state, ctx, loss, steps, extra=None):
        alpha = self.hp.get("alpha", 0.01)
        update = super().finish(client, model, global_state, ctx, loss, steps)
        for k, g in client.extra["dyn_grad"].items():
            g -= alpha * (update.weights[k] - global_state[k])
        return update

    def aggregate(self, global_state, updates, n_clients):
        alpha = self.hp.get("alpha", 0.01)
        out = {}
        for k, w in global_state.items():
            avg = weighted_mean(updates, k)
            if not w.is_floating_point():
                out[k] = avg
                continue
            drift = sum(u.weights[k] - w for u in updates) / n_clients
            self.h[k] = self.h.get(k, torch.zeros_like(w)) - alpha * drift
            out[k] = avg - self.h[k] / alpha
        return out

    def state_dict(self):
        return {"h": self.h}

    def load_state_dict(self, state):
        self.h = dict(state["h"])


class Scaffold(FedAvg):
    """Karimireddy et al.: gradients corrected by c - c_i; c_i+ = c_i - c + (w_g - w_i)/(K lr)
    (option II; with the momentum SGD used for every strategy here, K lr is the nominal
    step budget); server c += |S|/N mean(delta c_i)."""
    name = "scaffold"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.c = {}

    def before_step(self, client, model, global_state):
        params = dict(model.named_parameters())
        c_i = client.extra.setdefault("c", {})

        def correct():
            for k, p in params.items():
                if k in global_state and p.grad is not None:
                    p.grad += self.c.get(k, 0) - c_i.get(k, 0)
        return correct

    def finish(self, client, model, global_state, ctx, loss, steps, extra=None):
        update = super().finish(client, model, global_state, ctx, loss, steps)
        c_i = client.extra.setdefault("c", {})
        delta_c = {}
        params = dict(model.named_parameters())
        for k, w in update.weights.items():
            if k not in params:
                continue
            new = c_i.get(k, torch.zeros_like(w)) - self.c.get(k, 0) + (global_state[k] - w) / (max(steps, 1) * ctx.lr)
            delta_c[k] = new - c_i.get(k, torch.zeros_like(w))
            c_i[k] = new
        update.extra["delta_c"] = delta_c
        return update

    def aggregate(self, global_state, updates, n_clients):
        for k in updates[0].extra["delta_c"]:
            mean = sum(u.extra["delta_c"][k] for u in updates) / len(updates)
            self.c[k] = self.c.get(k, torch.zeros_like(mean)) + len(updates) / n_clients * mean
        return super().aggregate(global_state, updates, n_clients)

    def state_dict(self):
        return {"c": self.c}

    def load_state_dict(self, state):
        self.c = dict(state["c"])


class Moon(FedAvg):
    """Li et al.: mu * contrastive loss pulling the representation toward the global
    model's and away from the client's previous model's (temperature tau)."""
    name = "moon"

    def objective(self, client, model, ctx, global_state):
        mu, tau = self.hp.get("mu", 1.0), self.hp.get("tau", 0.5)
        # The previous client's last training forward left graph-attached features on the
        # shared model, which deepcopy refuses; the copies compute their own.
        model.feature_module.features = None
        glob = copy.deepcopy(model).eval()  # model holds the global weights right now
        prev = copy.deepcopy(model).eval()
        if "prev" in client.extra:
            prev.load_state_dict(client.extra["prev"])

        def loss_of(x, y):
            logits = model(x)
            z = model.feature_module.features
            with torch.no_grad():
                glob(x)
                prev(x)
            pos = F.cosine_similarity(z, glob.feature_module.features) / tau
            neg = F.cosine_similarity(z, prev.feature_module.features) / tau
            con = -torch.log_softmax(torch.stack([pos, neg], 1), 1)[:, 0].mean()
            return ctx.loss_fn(logits, y) + mu * con
        return loss_of

    def finish(self, client, model, global_state, ctx, loss, steps, extra=None):
        client.extra["prev"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return super().finish(client, model, global_state, ctx, loss, steps)


class Ditto(FedAvg):
    """Li et al.: the global model trains as FedAvg; each client also trains a personal
    model with lambda/2 ||v - w_g||^2 and is evaluated with it."""
    name = "ditto"

    def client_train(self, client, model, global_state, ctx):
        update = super().client_train(client, model, global_state, ctx)
        lam = self.hp.get("lam", 0.1)
        personal = client.extra.get("personal")
        if personal is None:  # first round: the personal model starts from the global one
            load_state(model, global_state, client.local_state)
        else:
            model.load_state_dict(personal)
        ref = {k: v for k, v in global_state.items() if v.is_floating_point()}
        sgd(model, client, params=trainable(model), epochs=ctx.epochs, batch_size=ctx.batch_size,
            lr=ctx.lr, seed=ctx.seed + 1, deadline=ctx.deadline,
            loss_of=lambda x, y: ctx.loss_fn(model(x), y) + lam / 2 * _sq_dist(model, ref))
        client.extra["personal"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return update

    def eval_state(self, client, global_state):
        if "personal" in client.extra:
            return client.extra["personal"], {}
        return global_state, client.local_state


class OmniFM(FedAvg):
    """Shared: backbone, spectral tokenizer, ECA (and its output projection); private:
    task head and suffix prompts. Local loss adds lambda * SPAlign; clients upload the
    class means of their spectral tokens and their retrieval counts for the bank."""
    name = "omnifm"
    uses_bank = True

    def __init__(self, *, head_prefix, **kw):
        super().__init__(**kw)
        self.private_prefixes = (head_prefix, "suffix")

    def objective(self, client, model, ctx, global_state):
        lam = self.hp.get("lam", 0.1)
        return lambda x, y: ctx.loss_fn(model(x), y) + lam * model.alignment_loss()

    def client_train(self, client, model, global_state, ctx):
        model.set_bank(ctx.bank)  # the bank is a non-persistent buffer: loading states keeps it
        update = super().client_train(client, model, global_state, ctx)
        update.retrieval_counts = model.retrieval_counts.clone()
        update.bank_upload = prototypes(model, client, ctx.prototype_groups)
        return update


@torch.no_grad()
def prototypes(model, client, groups_of=None, min_count=2):
    """Mean spectral token of each group of the client's training samples (groups with
    >= min_count images; never single-image tokens). groups_of(targets) -> (n,) int64
    groups; None: the targets are the groups (classes). Falls back to the overall mean."""
    model.eval()
    tokens, targets = [], []
    for x, y in in_order(client.train):
        tokens.append(model.spectral_tokens(x))
        targets.append(y)
    tokens, targets = torch.cat(tokens), torch.cat(targets)
    groups = targets if groups_of is None else groups_of(targets)
    # All groups' sums in one pass (a Python loop over groups costs four ops per group).
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = tokens.new_zeros(len(counts), tokens.shape[1]).index_add_(0, inverse, tokens)
    keep = counts >= min_count
    if not keep.any():
        return tokens.mean(0, keepdim=True)
    return sums[keep] / counts[keep, None].to(tokens.dtype)


STRATEGIES = {cls.name: cls for cls in (Local, FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedDyn, Scaffold, Moon,
                                        Ditto, FedPer, FedRep, OmniFM)}


def make_strategy(name, *, head_prefix, **hp):
    if name not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)}, got {name!r}")
    cls = STRATEGIES[name]
    if issubclass(cls, (FedPer, OmniFM)):
        return cls(head_prefix=head_prefix, **hp)
    return cls(**hp)
