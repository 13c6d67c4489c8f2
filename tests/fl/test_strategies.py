"""Each strategy against a float64 hand replay over several rounds.

The code under test trains a tiny float32 model through `client_train` and aggregates
with `aggregate`; the replay below re-derives every round in float64 from the papers'
formulas: its own forward pass, loss terms and momentum-SGD loop (torch autograd only
differentiates the hand-written loss). Three rounds with changing participants matter:
FedDyn's linear term, SCAFFOLD's control variates, MOON's previous model and Ditto's
personal model only act from the second round on.
"""
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from omnifm.fl.client import Client, Update, split_state
from omnifm.fl.simulation import RoundContext
from omnifm.fl.strategies import STRATEGIES, make_strategy, prototypes, weighted_mean

HEAD = "head."
BODY_KEYS, HEAD_KEYS = ("body.weight", "body.bias"), ("head.weight", "head.bias")
LR, EPOCHS, BATCH = 0.2, 2, 4
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # client.sgd's optimizer
N_CLIENTS = 3
pytestmark = pytest.mark.usefixtures("one_thread")
PLAN = [(0, 1), (1, 2), (0, 1)]  # participants per round: |S| < N, client 2 joins late
SIZES = (8, 12, 4)  # 2, 3 and 1 batches per epoch: steps != epochs


class Net(nn.Module):
    """body: Linear(3, 4) + tanh (MOON's features), head: Linear(4, 2); seeded init."""

    def __init__(self, seed=0):
        super().__init__()
        self.body = nn.utils.skip_init(nn.Linear, 3, 4)
        self.head = nn.utils.skip_init(nn.Linear, 4, 2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    @property
    def feature_module(self):  # a property: an attribute would register body twice
        return self.body

    def forward(self, x):
        h = torch.tanh(self.body(x))
        self.body.features = h
        return self.head(h)


class OmniNet(Net):
    """Net plus the hooks OmniFM uses: a private `suffix` logit bias, an alignment loss
    on the body weights, tokens = the body's pre-activation, a call-counting bank."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.suffix = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.retrieval_counts = torch.zeros(0, dtype=torch.int64)

    def forward(self, x):
        self.retrieval_counts += 1
        return super().forward(x) + self.suffix

    def set_bank(self, bank):
        self.retrieval_counts = torch.zeros(len(bank), dtype=torch.int64)

    def alignment_loss(self):
        return (self.body.weight ** 2).sum()

    def spectral_tokens(self, x):
        return self.body(x)


class InOrder(Client):
    """Batches in file order (no shuffle), so the replay can walk the same ones."""

    def batches(self, epochs, batch_size, seed):
        for _ in range(epochs):
            for i in range(0, self.n_train, batch_size):
                yield tuple(t[i:i + batch_size] for t in self.train.tensors)


def data(cid):
    g = torch.Generator().manual_seed(100 + cid)
    x = torch.randn(SIZES[cid], 3, generator=g)
    y = torch.arange(SIZES[cid]) % 2  # both classes in every batch
    return x, y


def ctx(r=0, bank=None):
    return RoundContext(r, 7, EPOCHS, BATCH, LR, nn.functional.cross_entropy, bank)


# -- the code under test ---------------------------------------------------------
def run_code(name, model_cls=Net, bank=None, **hp):
    """PLAN through the real strategy; per round (updates {cid: Update}, global, probes)."""
    s = make_strategy(name, head_prefix=HEAD, **hp)
    model = model_cls()
    glob, local = split_state(model, s.is_shared)
    clients = [InOrder(cid, TensorDataset(*data(cid)), TensorDataset(*data(cid)),
                       {k: v.clone() for k, v in local.items()})
               for cid in range(N_CLIENTS)]
    rounds = []
    for r, part in enumerate(PLAN):
        ups = {cid: s.client_train(clients[cid], model, glob, ctx(r, bank)) for cid in part}
        glob = s.aggregate(glob, list(ups.values()), N_CLIENTS)
        rounds.append((ups, glob, code_probes(s, clients)))
    return rounds


def code_probes(s, clients):
    """Every piece of strategy and client state, flattened to {name: tensor copy}."""
    out = {}
    for name, state in (("h", getattr(s, "h", {})), ("c", getattr(s, "c", {}))):
        out.update({f"{name}/{k}": v.clone() for k, v in state.items()})
    for c in clients:
        parts = {"local": c.local_state, "g": c.extra.get("dyn_grad", {}), "ci": c.extra.get("c", {}),
                 "prev": c.extra.get("prev", {}), "personal": c.extra.get("personal", {})}
        for name, state in parts.items():
            out.update({f"{name}{c.cid}/{k}": v.clone() for k, v in state.items()})
    return out


# -- the float64 replay ------------------------------------------------------------
def init64(model_cls=Net):
    return {k: v.double() for k, v in model_cls().state_dict().items()}


def forward64(p, x):
    """(features, logits) of Net/OmniNet written out by hand."""
    z = torch.tanh(x.double() @ p["body.weight"].T + p["body.bias"])
    logits = z @ p["head.weight"].T + p["head.bias"]
    return z, logits + p["suffix"] if "suffix" in p else logits


def ce64(logits, y):
    return (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean()


def sq64(p, ref):
    return sum(((p[k] - ref[k]) ** 2).sum() for k in ref)


def sgd64(p, names, loss_of, cid, epochs=EPOCHS, correction=None):
    """torch.optim.SGD(momentum 0.9, weight decay 5e-4) by hand on p[names], over the
    same in-order batches; `correction` is added to each gradient first (SCAFFOLD).
    Returns (mean loss, steps)."""
    x, y = data(cid)
    p.update({k: p[k].detach().clone().requires_grad_(k in names) for k in p})
    buf, losses = {}, []
    for _ in range(epochs):
        for i in range(0, len(y), BATCH):
            loss = loss_of(p, x[i:i + BATCH], y[i:i + BATCH])
            grads = torch.autograd.grad(loss, [p[k] for k in names])
            with torch.no_grad():
                for k, g in zip(names, grads):
                    d = g + (correction[k] if correction else 0) + WEIGHT_DECAY * p[k]
                    buf[k] = d if k not in buf else MOMENTUM * buf[k] + d
                    p[k] -= LR * buf[k]
            losses.append(loss.item())
    for k in p:
        p[k] = p[k].detach()
    return sum(losses) / len(losses), len(losses)


def plain(p, x, y):
    return ce64(forward64(p, x)[1], y)


def cos64(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def hand_client(name, hp, server, cs, wg, cid):
    """One client's round in float64. cs: the client's persistent state (private
    weights under "local", strategy state under its own keys); returns (weights, loss)."""
    p = {**wg, **cs["local"]}
    if name == "fedprox":
        mu = hp["mu"]
        loss, _ = sgd64(p, list(p), lambda p, x, y: plain(p, x, y) + mu / 2 * sq64(p, wg), cid)
    elif name == "feddyn":  # Acar et al. eq. (3): L - <g_i, w> + alpha/2 ||w - w_g||^2
        alpha, g = hp["alpha"], cs.setdefault("g", {k: torch.zeros_like(v) for k, v in wg.items()})
        linear = lambda p: sum((p[k] * g[k]).sum() for k in g)  # noqa: E731
        loss, _ = sgd64(p, list(p), lambda p, x, y: plain(p, x, y) - linear(p) + alpha / 2 * sq64(p, wg), cid)
        cs["g"] = {k: g[k] - alpha * (p[k] - wg[k]) for k in g}  # g_i = grad L(w_i) at the optimum
    elif name == "scaffold":  # Karimireddy et al. option II
        zero = {k: torch.zeros_like(v) for k, v in wg.items()}
        c, ci = server.get("c", zero), cs.get("ci", zero)
        loss, steps = sgd64(p, list(p), plain, cid, correction={k: c[k] - ci[k] for k in p})
        new = {k: ci[k] - c[k] + (wg[k] - p[k]) / (steps * LR) for k in p}
        cs["delta_c"], cs["ci"] = {k: new[k] - ci[k] for k in p}, new
    elif name == "moon":  # Li et al.: positive = global model, negative = own previous model
        mu, tau = hp["mu"], hp["tau"]
        prev = cs.get("prev", wg)

        def loss_of(p, x, y):
            z, logits = forward64(p, x)
            pos, neg = cos64(z, forward64(wg, x)[0]) / tau, cos64(z, forward64(prev, x)[0]) / tau
            con = (torch.logaddexp(pos, neg) - pos).mean()
            return ce64(logits, y) + mu * con
        loss, _ = sgd64(p, list(p), loss_of, cid)
        cs["prev"] = dict(p)
    elif name == "ditto":
        loss, _ = sgd64(p, list(p), plain, cid)
        v = dict(cs.get("personal", wg))  # first round: the personal model starts at w_g
        sgd64(v, list(v), lambda v, x, y: plain(v, x, y) + hp["lam"] / 2 * sq64(v, wg), cid)
        cs["personal"] = v
    elif name == "fedrep":  # head with the body frozen, then body with the head frozen
        sgd64(p, list(HEAD_KEYS), plain, cid, epochs=hp["head_epochs"])
        loss, _ = sgd64(p, list(BODY_KEYS), plain, cid)
    elif name == "omnifm":
        lam = hp["lam"]
        loss, steps = sgd64(p, list(p), lambda p, x, y: plain(p, x, y) + lam * (p["body.weight"] ** 2).sum(), cid)
        x, y = data(cid)
        tokens = x.double() @ p["body.weight"].T + p["body.bias"]
        cs["upload"] = torch.stack([tokens[y == c].mean(0) for c in (0, 1)])
        cs["counts"] = steps
    else:  # fedavg, fedper, local: plain local training
        loss, _ = sgd64(p, list(p), plain, cid)
    cs["local"] = {k: p[k] for k in cs["local"]}
    return {k: p[k] for k in wg}, loss


def hand_server(name, hp, server, wg, ws, cstates):
    """The server step in float64; ws: {cid: weights}."""
    n = {cid: SIZES[cid] for cid in ws}
    mean = {k: sum(ws[c][k] * n[c] for c in ws) / sum(n.values()) for k in wg}
    if name == "feddyn":  # h -= alpha/N sum (w_i - w_g); w = mean - h / alpha
        alpha = hp["alpha"]
        h = server.get("h", {k: torch.zeros_like(v) for k, v in wg.items()})
        server["h"] = {k: h[k] - alpha / N_CLIENTS * sum(ws[c][k] - wg[k] for c in ws) for k in wg}
        return {k: mean[k] - server["h"][k] / alpha for k in wg}
    if name == "scaffold":  # c += |S|/N mean(delta c_i) = sum(delta c_i) / N
        c = server.get("c", {k: torch.zeros_like(v) for k, v in wg.items()})
        server["c"] = {k: c[k] + sum(cstates[i]["delta_c"][k] for i in ws) / N_CLIENTS for k in wg}
    return mean


PRIVATE = {"local": ("",), "fedper": (HEAD,), "fedrep": (HEAD,), "omnifm": (HEAD, "suffix")}


def run_hand(name, model_cls=Net, **hp):
    """PLAN replayed in float64; per round ({cid: (weights, loss, client state)}, global, server)."""
    start = init64(model_cls)
    private = PRIVATE.get(name, ())
    wg = {k: v for k, v in start.items() if not k.startswith(private)}
    cstates = [{"local": {k: v for k, v in start.items() if k.startswith(private)}} for _ in range(N_CLIENTS)]
    server, rounds = {}, []
    for part in PLAN:
        ws, out = {}, {}
        for cid in part:
            ws[cid], loss = hand_client(name, hp, server, cstates[cid], wg, cid)
            out[cid] = (ws[cid], loss, dict(cstates[cid]))
        wg = hand_server(name, hp, server, wg, ws, cstates)
        rounds.append((out, wg, dict(server)))
    return rounds


def close(got, want, what):
    assert got.shape == want.shape, what
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def check_against_hand(name, model_cls=Net, bank=None, **hp):
    code, hand = run_code(name, model_cls, bank, **hp), run_hand(name, model_cls, **hp)
    for r, ((ups, glob, probes), (want_ups, want_glob, server)) in enumerate(zip(code, hand)):
        assert set(glob) == set(want_glob), f"round {r}: shared tensors"
        for k in glob:
            close(glob[k], want_glob[k], f"round {r}: global {k}")
        for cid, (w, loss, cs) in want_ups.items():
            assert set(ups[cid].weights) == set(w) and ups[cid].n_samples == SIZES[cid]
            assert ups[cid].loss == pytest.approx(loss, rel=1e-5), f"round {r}: client {cid} loss"
            for k in w:
                close(ups[cid].weights[k], w[k], f"round {r}: client {cid} upload {k}")
            for part in ("local", "g", "ci", "prev", "personal"):
                for k, v in cs.get(part, {}).items():
                    close(probes[f"{part}{cid}/{k}"], v, f"round {r}: client {cid} {part} {k}")
        for part in ("h", "c"):
            for k, v in server.get(part, {}).items():
                close(probes[f"{part}/{k}"], v, f"round {r}: server {part} {k}")
    return code, hand


# -- client training + aggregation, whole federations -------------------------------
@pytest.mark.parametrize("name,hp", [
    ("fedavg", {}),
    ("fedprox", {"mu": 0.5}),
    ("feddyn", {"alpha": 0.3}),
    ("scaffold", {}),
    ("moon", {"mu": 1.0, "tau": 0.5}),
    ("ditto", {"lam": 1.0}),
    ("fedper", {}),
    ("fedrep", {"head_epochs": 1}),
    ("local", {}),
])
def test_federation_matches_hand_replay(name, hp):
    code, _ = check_against_hand(name, **hp)
    if name in ("fedper", "fedrep"):  # the head never leaves the client
        assert all("head.weight" not in u.weights for ups, _, _ in code for u in ups.values())
    if name == "local":
        assert all(glob == {} and all(u.weights == {} for u in ups.values()) for ups, glob, _ in code)


def test_omnifm_trains_with_alignment_and_uploads_prototypes():
    bank = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    code, hand = check_against_hand("omnifm", OmniNet, bank, lam=0.05)
    for (ups, _, _), (want, _, _) in zip(code, hand):
        for cid, (_, _, cs) in want.items():
            close(ups[cid].bank_upload, cs["upload"], f"client {cid} prototypes")
            assert ups[cid].retrieval_counts.tolist() == [cs["counts"]] * len(bank)  # reset per round
            assert "suffix" not in ups[cid].weights


def test_moon_contrastive_term_with_distinct_global_and_previous():
    """One loss value: positive = the global model's features, negative = the previous model's."""
    mu, tau = 0.7, 0.4
    s = make_strategy("moon", head_prefix=HEAD, mu=mu, tau=tau)
    model, prev_model = Net(0), Net(1)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    c = InOrder(0, TensorDataset(*data(0)), TensorDataset(*data(0)), {}, extra={"prev": prev_model.state_dict()})
    loss_of = s.objective(c, model, ctx(), glob)
    with torch.no_grad():
        model.body.weight += 0.3  # the client model moves away from the global one
    x, y = data(0)
    p = {k: v.double() for k, v in model.state_dict().items()}
    z, logits = forward64(p, x)
    pos = cos64(z, forward64(init64(), x)[0]) / tau
    neg = cos64(z, forward64({k: v.double() for k, v in prev_model.state_dict().items()}, x)[0]) / tau
    want = ce64(logits, y) - mu * torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(neg))).mean()
    assert (pos - neg).abs().min() > 0.1  # the term is not the pos == neg constant log 2
    assert loss_of(x, y).item() == pytest.approx(want.item(), rel=1e-5)


# -- server optimizers -----------------------------------------------------------
# Several rounds whose deltas change sign and size, so momentum, Yogi's sign rule and
# the first-moment EMA all matter (one step from v0 = tau^2 cannot tell Adam from Yogi).
SERVER_ROUNDS = [  # per round: [(n_samples, client weight)] for a 2-vector
    [(1, [3.0, -1.0]), (3, [1.0, 0.5])],
    [(2, [0.0, 0.0]), (2, [-1.0, 2.0])],
    [(1, [2.5, 0.1])],
    [(4, [0.2, -0.3]), (1, [4.0, 1.0])],
]


def server_run(name, rounds=SERVER_ROUNDS, **hp):
    s = make_strategy(name, head_prefix=HEAD, **hp)
    glob, out = {"w": torch.tensor([1.0, -2.0])}, []
    for ups in rounds:
        glob = s.aggregate(glob, [Update(i, n, {"w": torch.tensor(w)}, 0.0) for i, (n, w) in enumerate(ups)], 5)
        out.append(glob["w"].tolist())
    return out


def round_mean(ups):
    """Sample-weighted mean of one SERVER_ROUNDS entry, in python floats."""
    return [sum(n * w[j] for n, w in ups) / sum(n for n, _ in ups) for j in range(2)]


def test_fedavgm_momentum_over_rounds():
    beta, lr = 0.6, 0.7
    got = server_run("fedavgm", server_momentum=beta, server_lr=lr)
    w, m = [1.0, -2.0], [0.0, 0.0]
    for r, ups in enumerate(SERVER_ROUNDS):
        mean = round_mean(ups)
        m = [beta * m[j] + (mean[j] - w[j]) for j in range(2)]
        w = [w[j] + lr * m[j] for j in range(2)]
        assert got[r] == pytest.approx(w, rel=1e-6), r


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_steps_over_rounds(name):
    b1, b2, lr, tau = 0.8, 0.9, 0.3, 0.05
    got = server_run(name, beta1=b1, beta2=b2, server_lr=lr, tau=tau)
    w, m, v = [1.0, -2.0], [0.0, 0.0], [tau ** 2] * 2
    signs = set()
    for r, ups in enumerate(SERVER_ROUNDS):
        mean = round_mean(ups)
        for j in range(2):
            d = mean[j] - w[j]
            m[j] = b1 * m[j] + (1 - b1) * d
            if name == "fedadam":
                v[j] = b2 * v[j] + (1 - b2) * d * d
            else:  # Yogi: v moves toward d^2 by (1 - b2) d^2, whichever side it is on
                signs.add(math.copysign(1, v[j] - d * d))
                v[j] = v[j] - (1 - b2) * d * d * math.copysign(1, v[j] - d * d)
            w[j] += lr * m[j] / (math.sqrt(v[j]) + tau)
        assert got[r] == pytest.approx(w, rel=1e-5), r
    assert name == "fedadam" or signs == {-1.0, 1.0}  # both branches of Yogi's rule ran


def test_feddyn_server_state_over_rounds():
    alpha = 0.5
    got = server_run("feddyn", alpha=alpha)
    w, h = [1.0, -2.0], [0.0, 0.0]
    for r, ups in enumerate(SERVER_ROUNDS):
        mean = round_mean(ups)
        h = [h[j] - alpha / 5 * sum(u[j] - w[j] for _, u in ups) for j in range(2)]
        w = [mean[j] - h[j] / alpha for j in range(2)]
        assert got[r] == pytest.approx(w, rel=1e-5), r


def scaffold_updates(r):
    ups = [Update(i, n, {"w": torch.tensor(w)}, 0.0) for i, (n, w) in enumerate(SERVER_ROUNDS[r])]
    for i, u in enumerate(ups):
        u.extra["delta_c"] = {"w": torch.tensor([r + 1.0, -2.0 * i])}
    return ups


def test_scaffold_server_control_variate():
    s = make_strategy("scaffold", head_prefix=HEAD)
    c = [0.0, 0.0]
    glob = {"w": torch.tensor([1.0, -2.0])}
    for r, ups in enumerate(SERVER_ROUNDS):
        glob = s.aggregate(glob, scaffold_updates(r), 5)
        c = [c[j] + sum([r + 1.0, -2.0 * i][j] for i in range(len(ups))) / 5 for j in range(2)]  # |S|/N mean
        assert s.c["w"].tolist() == pytest.approx(c, rel=1e-6), r
        mean = round_mean(ups)
        assert glob["w"].tolist() == pytest.approx(round_mean(ups), rel=1e-6), r


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "feddyn", "scaffold"])
def test_server_state_survives_a_checkpoint(name):
    """Two rounds, save, a fresh strategy loads the state and runs the last two: the same
    trajectory as one uninterrupted strategy."""
    def aggregate(s, glob, r):
        ups = scaffold_updates(r) if name == "scaffold" else \
            [Update(i, n, {"w": torch.tensor(w)}, 0.0) for i, (n, w) in enumerate(SERVER_ROUNDS[r])]
        return s.aggregate(glob, ups, 5)

    whole, first = make_strategy(name, head_prefix=HEAD), make_strategy(name, head_prefix=HEAD)
    a = b = {"w": torch.tensor([1.0, -2.0])}
    for r in range(2):
        a, b = aggregate(whole, a, r), aggregate(first, b, r)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make_strategy(name, head_prefix=HEAD)
    resumed.load_state_dict(torch.load(buf))
    for r in range(2, len(SERVER_ROUNDS)):
        a, b = aggregate(whole, a, r), aggregate(resumed, b, r)
        assert torch.equal(a["w"], b["w"]), r
    # SCAFFOLD's c never reaches the weights inside one round: compare the state itself.
    want, got = whole.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(
        want[part].keys() == got[part].keys() and all(torch.equal(want[part][k], got[part][k]) for k in want[part])
        for part in want)


# -- building blocks ---------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(1, 50), st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3)),
                min_size=1, max_size=6))
def test_weighted_mean_weights_by_samples(ups):
    updates = [Update(i, n, {"w": torch.tensor(w, dtype=torch.float32)}, 0.0) for i, (n, w) in enumerate(ups)]
    total = sum(n for n, _ in ups)
    want = [sum(n * float(torch.tensor(w, dtype=torch.float32)[j]) for n, w in ups) / total for j in range(3)]
    out = weighted_mean(updates, "w")
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(want, rel=1e-6, abs=1e-4)


def test_prototypes_are_class_means_of_frequent_classes():
    model = OmniNet()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, 0, 2, 1, 0, 2, 0])  # class 1 has one image: not uploaded
    c = Client(0, TensorDataset(x, y), TensorDataset(x, y), {})
    tokens = x.double() @ model.body.weight.double().T + model.body.bias.double()
    close(prototypes(model, c), torch.stack([tokens[y == 0].mean(0), tokens[y == 2].mean(0)]), "prototypes")
    single = Client(0, TensorDataset(x[:3], torch.tensor([0, 1, 2])), TensorDataset(x, y), {})  # no class qualifies: the overall mean
    close(prototypes(model, single), tokens[:3].mean(0, keepdim=True), "fallback")


def test_registry_has_every_strategy():
    assert set(STRATEGIES) == {"local", "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "feddyn", "scaffold",
                               "moon", "ditto", "fedper", "fedrep", "omnifm"}
    with pytest.raises(ValueError, match="strategy"):
        make_strategy("fedsgd", head_prefix=HEAD)


def test_parameter_policies():
    names = ["body.weight", "bn.weight", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
             "head.weight", "head.bias", "suffix"]
    shared = {n: {name for name in names if make_strategy(n, head_prefix=HEAD).is_shared(name)} for n in STRATEGIES}
    common = {"body.weight", "bn.weight", "head.weight", "head.bias", "suffix"}
    for n in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "feddyn", "scaffold", "moon", "ditto"):
        assert shared[n] == common, n  # FedBN-style: running statistics stay local
    assert shared["fedper"] == shared["fedrep"] == common - {"head.weight", "head.bias"}
    assert shared["omnifm"] == {"body.weight", "bn.weight"}  # head and suffix prompts stay private
    assert shared["local"] == set()
    with_stats = make_strategy("fedavg", head_prefix=HEAD, share_bn_stats=True)
    assert all(with_stats.is_shared(n) for n in names)
