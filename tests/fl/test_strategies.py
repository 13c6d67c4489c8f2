"""Each strategy's aggregation and local objective on small hand-computed cases."""
import math

import pytest
import torch
from torch import nn

from omnifm.fl.client import Client, Update
from omnifm.fl.simulation import RoundContext
from omnifm.fl.strategies import STRATEGIES, make_strategy

HEAD = "backbone.fc."


class Tiny(nn.Module):
    """backbone.body (linear + BN) and backbone.fc (head); features for MOON."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Linear(3, 4)
        self.backbone.bn = nn.BatchNorm1d(4)
        self.backbone.fc = nn.Linear(4, 2)
        self.feature_module = self.backbone.bn

    def forward(self, x):
        h = self.backbone.bn(self.backbone.body(x))
        self.feature_module.features = h
        return self.backbone.fc(torch.relu(h))

    def alignment_loss(self):
        return torch.zeros(())


def update(cid, n, **weights):
    return Update(cid, n, {k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()}, 0.0)


def ctx(seed=0, lr=0.1):
    return RoundContext(0, seed, 1, 4, lr, nn.functional.cross_entropy, None)


def client(cid=0, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)
    return Client(cid, x, y, x, y, {})


def test_registry_has_every_strategy():
    assert set(STRATEGIES) == {"local", "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "feddyn", "scaffold",
                               "moon", "ditto", "fedper", "fedrep", "omnifm"}
    with pytest.raises(ValueError, match="strategy"):
        make_strategy("fedsgd", head_prefix=HEAD)


def test_fedavg_weights_by_samples():
    s = make_strategy("fedavg", head_prefix=HEAD)
    out = s.aggregate({"w": torch.tensor([0.0, 0.0])}, [update(0, 1, w=[1.0, 2.0]), update(1, 3, w=[5.0, 6.0])], 2)
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0]))  # (1*[1,2] + 3*[5,6]) / 4


def test_fedavgm_momentum():
    s = make_strategy("fedavgm", head_prefix=HEAD, server_momentum=0.5, server_lr=1.0)
    g = {"w": torch.tensor([1.0])}
    g = s.aggregate(g, [update(0, 1, w=[3.0])], 1)  # delta 2 -> m 2 -> w 3
    assert g["w"].item() == pytest.approx(3.0)
    g = s.aggregate(g, [update(0, 1, w=[4.0])], 1)  # delta 1 -> m 0.5*2+1 = 2 -> w 5
    assert g["w"].item() == pytest.approx(5.0)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_step(name):
    b1, b2, lr, tau = 0.9, 0.99, 0.1, 1e-3
    s = make_strategy(name, head_prefix=HEAD, beta1=b1, beta2=b2, server_lr=lr, tau=tau)
    out = s.aggregate({"w": torch.tensor([1.0])}, [update(0, 1, w=[3.0])], 1)
    d = 2.0
    m = (1 - b1) * d
    v0 = tau ** 2
    v = b2 * v0 + (1 - b2) * d * d if name == "fedadam" else v0 - (1 - b2) * d * d * math.copysign(1, v0 - d * d)
    assert out["w"].item() == pytest.approx(1.0 + lr * m / (math.sqrt(v) + tau), rel=1e-5)


def test_feddyn_server_correction():
    alpha = 0.5
    s = make_strategy("feddyn", head_prefix=HEAD, alpha=alpha)
    out = s.aggregate({"w": torch.tensor([0.0])}, [update(0, 1, w=[2.0]), update(1, 1, w=[4.0])], 4)
    h = -alpha * (2.0 + 4.0) / 4  # h -= alpha/N * sum(w_i - w_g)
    assert out["w"].item() == pytest.approx(3.0 - h / alpha)


def test_scaffold_control_variates():
    s = make_strategy("scaffold", head_prefix=HEAD)
    u0, u1 = update(0, 1, w=[1.0]), update(1, 1, w=[1.0])
    u0.extra["delta_c"], u1.extra["delta_c"] = {"w": torch.tensor([2.0])}, {"w": torch.tensor([4.0])}
    s.aggregate({"w": torch.tensor([0.0])}, [u0, u1], 4)
    assert s.c["w"].item() == pytest.approx(2 / 4 * 3.0)  # |S|/N * mean(delta c)
    # Local gradients are corrected by c - c_i.
    model, c = Tiny(), client()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    s.c = {k: torch.full_like(v, 0.5) for k, v in model.named_parameters()}
    c.extra["c"] = {k: torch.full_like(v, 0.2) for k, v in model.named_parameters()}
    model(c.train_x).sum().backward()
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    s.before_step(c, model, global_state)()
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, before[k] + 0.3)


def test_fedprox_objective():
    mu = 0.4
    s = make_strategy("fedprox", head_prefix=HEAD, mu=mu)
    model, c = Tiny(), client()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.backbone.body.weight += 0.5  # 12 entries moved by 0.5
    loss = s.objective(c, model, ctx(), ref)(c.train_x, c.train_y)
    model.train()
    want = nn.functional.cross_entropy(model(c.train_x), c.train_y) + mu / 2 * 12 * 0.25
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_moon_contrastive_term():
    s = make_strategy("moon", head_prefix=HEAD, mu=1.0, tau=0.5)
    model, c = Tiny(), client()
    loss_of = s.objective(c, model, ctx(), {})
    model.train()
    ce = nn.functional.cross_entropy(model(c.train_x), c.train_y).item()
    # Global and previous models equal the current one: pos = neg, so the term is log 2.
    assert loss_of(c.train_x, c.train_y).item() == pytest.approx(ce + math.log(2), rel=1e-5)


def test_policies_and_bn_stats():
    model = Tiny()
    names = list(model.state_dict())
    fedavg = make_strategy("fedavg", head_prefix=HEAD)
    assert not fedavg.is_shared("backbone.bn.running_mean") and fedavg.is_shared("backbone.bn.weight")
    assert make_strategy("fedavg", head_prefix=HEAD, share_bn_stats=True).is_shared("backbone.bn.running_var")
    for name in ("fedper", "fedrep", "omnifm"):
        s = make_strategy(name, head_prefix=HEAD)
        assert not s.is_shared("backbone.fc.weight") and s.is_shared("backbone.body.weight")
    assert not make_strategy("omnifm", head_prefix=HEAD).is_shared("suffix")
    assert not any(make_strategy("local", head_prefix=HEAD).is_shared(n) for n in names)


def _round(name, **hp):
    s = make_strategy(name, head_prefix=HEAD, **hp)
    torch.manual_seed(0)
    model = Tiny()
    global_state = {k: v.clone() for k, v in model.state_dict().items() if s.is_shared(k)}
    local = {k: v.clone() for k, v in model.state_dict().items() if not s.is_shared(k)}
    c = client()
    c.local_state = local
    return s, model, global_state, c, s.client_train(c, model, global_state, ctx())


def test_fedrep_trains_head_then_body():
    s, model, global_state, c, upd = _round("fedrep", head_epochs=1)
    assert "backbone.fc.weight" in c.local_state and "backbone.fc.weight" not in upd.weights
    assert not torch.equal(upd.weights["backbone.body.weight"], global_state["backbone.body.weight"])


def test_ditto_personal_model_is_evaluated():
    s, model, global_state, c, upd = _round("ditto", lam=0.1)
    state, local = s.eval_state(c, global_state)
    assert local == {} and set(state) == set(model.state_dict())
    assert not torch.equal(state["backbone.body.weight"], upd.weights["backbone.body.weight"])


def test_local_never_aggregates():
    s, model, global_state, c, upd = _round("local")
    assert global_state == {} and upd.weights == {}
    assert s.aggregate({}, [upd], 1) == {}
