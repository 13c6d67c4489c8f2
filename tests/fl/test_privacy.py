"""Differential privacy of uploads: the clipping and noise against hand computations,
the accountant against dp-accounting itself, and the federation with DP on."""
import math

import dp_accounting
import pytest
import torch

from omnifm.fl import FLConfig, Simulation
from omnifm.fl.client import Update
from omnifm.fl.privacy import GaussianUploads
from omnifm.fl.report import table

from .test_simulation import TINY, assert_same_state, simulate

pytestmark = pytest.mark.usefixtures("one_thread")


def update(weights, extra=None, protos=None):
    return Update(client=0, n_samples=5, weights=weights, loss=0.5, extra=extra or {}, bank_upload=protos,
                  retrieval_counts=torch.tensor([3, 1]))


def test_clipping_without_noise_by_hand():
    g = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0]]), "steps": torch.tensor(7)}
    w = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([[4.0]]), "steps": torch.tensor(9)}
    # change (3, 0, 4) has norm 5; clipped to C = 2: (1.2, 0, 1.6); the integer tensor is left as it is
    out = GaussianUploads(clip=2.0, noise=0.0, delta=1e-5).privatize(update(w), g, seed=0)
    torch.testing.assert_close(out.weights["a"], torch.tensor([2.2, 1.0]))
    torch.testing.assert_close(out.weights["b"], torch.tensor([[1.6]]))
    assert out.weights["steps"].item() == 9 and out.retrieval_counts is None
    # a change inside the ball passes unchanged
    small = GaussianUploads(clip=10.0, noise=0.0, delta=1e-5).privatize(update(w), g, seed=0)
    assert all(torch.equal(small.weights[k], w[k]) for k in w)


def test_extras_are_clipped_with_the_weights_and_prototypes_to_unit_norm():
    g = {"a": torch.zeros(1)}
    w = {"a": torch.tensor([3.0])}
    extra = {"delta_c": {"a": torch.tensor([4.0])}}  # SCAFFOLD's upload: one vector with the weights, norm 5
    protos = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = GaussianUploads(clip=1.0, noise=0.0, delta=1e-5).privatize(update(w, extra, protos), g, seed=0)
    torch.testing.assert_close(out.weights["a"], torch.tensor([0.6]))
    torch.testing.assert_close(out.extra["delta_c"]["a"], torch.tensor([0.8]))
    torch.testing.assert_close(out.bank_upload, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    assert torch.equal(extra["delta_c"]["a"], torch.tensor([4.0]))  # the client's own copy is untouched


def test_noise_has_the_calibrated_spread_and_is_reproducible():
    g = {"a": torch.zeros(200_000)}
    w = {"a": torch.zeros(200_000)}
    protos = torch.zeros(50, 4000)
    dp = GaussianUploads(clip=0.5, noise=1.5, delta=1e-5)
    out = dp.privatize(update(w, protos=protos), g, seed=3)
    assert out.weights["a"].std().item() == pytest.approx(0.75, rel=0.01)  # sigma * C
    assert abs(out.weights["a"].mean().item()) < 0.01
    assert out.bank_upload.std().item() == pytest.approx(1.5, rel=0.01)  # sigma (prototype norm bound 1)
    again = dp.privatize(update(w, protos=protos), g, seed=3)
    assert torch.equal(again.weights["a"], out.weights["a"]) and torch.equal(again.bank_upload, out.bank_upload)
    assert not torch.equal(dp.privatize(update(w), g, seed=4).weights["a"], out.weights["a"])


def test_epsilon_is_the_accountants():
    dp = GaussianUploads(clip=1.0, noise=1.2, delta=1e-6)
    for n in (1, 3, 10):
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(1.2), 2 * n)  # update and prototypes, each round
        assert dp.epsilon(n) == pytest.approx(accountant.get_epsilon(1e-6))
    assert dp.epsilon(0) == 0 and 0 < dp.epsilon(1) < dp.epsilon(3) < dp.epsilon(10)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.2), 7)  # the bank's seeding upload is one more
    assert dp.epsilon(3, seeded=True) == pytest.approx(accountant.get_epsilon(1e-6))
    assert 0 < dp.epsilon(0, seeded=True) < dp.epsilon(1)
    assert GaussianUploads(clip=1.0, noise=4.0, delta=1e-6).epsilon(3) < dp.epsilon(3)
    assert math.isinf(GaussianUploads(clip=1.0, noise=0.0, delta=1e-6).epsilon(1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dp_clip=-1.0), "dp_clip: expected a number >= 0"),
    (dict(dp_clip=1.0, dp_noise=-0.5), "dp_noise: expected a number >= 0"),
    (dict(dp_clip=1.0, dp_delta=1.0), "dp_delta: expected a value in (0, 1)"),
    (dict(dp_noise=1.0), "dp_noise: noise needs a clipping norm"),
])
def test_bad_privacy_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FLConfig(**kwargs)


@pytest.mark.parametrize("strategy", ["omnifm", "scaffold"])
def test_federation_reports_epsilon_and_resumes_exactly(strategy, tmp_path):
    dp = dict(dp_clip=1.0, dp_noise=0.8, dp_delta=1e-5)
    full = simulate(strategy, 3, tmp_path / "full", **dp)
    accountant = GaussianUploads(1.0, 0.8, 1e-5)
    for i, row in enumerate(full.history):
        taken = [c for r in full.history[:i + 1] for c in r["clients"]]
        seeded = strategy == "omnifm"  # every client also sent prototypes to seed the bank
        assert row["epsilon"] == pytest.approx(max(accountant.epsilon(taken.count(c), seeded) for c in range(3)))
        assert row["dp_delta"] == 1e-5
    assert [r["epsilon"] for r in full.history] == sorted(r["epsilon"] for r in full.history)
    simulate(strategy, 2, tmp_path / "cut", **dp)
    assert_same_state(simulate(strategy, 3, tmp_path / "cut", resume=True, **dp), full)
    plain = simulate(strategy, 1)
    assert "epsilon" not in plain.history[0]
    text = table({"private": full.history, "plain": plain.history})
    assert "| ε (δ) |" in text.splitlines()[0] and f"| {full.history[-1]['epsilon']:.2f} (1e-05) |" in text
    assert text.splitlines()[-1].endswith("| no DP |")


def test_the_bank_is_seeded_with_noised_prototypes():
    plain = Simulation(FLConfig(strategy="omnifm", rounds=1, **TINY), progress=False)
    private = Simulation(FLConfig(strategy="omnifm", rounds=1, dp_clip=0.5, dp_noise=1.0, **TINY), progress=False)
    plain.seed_bank(), private.seed_bank()
    # what each client sent: its prototypes plus N(0, 1) noise with its own generator; the
    # bank then projects every entry onto the unit ball
    sent = [private.privacy.privatize_prototypes(plain.bank.entries[plain.bank.owners == c],
                                                 torch.Generator().manual_seed(private.context(-1, c).seed + 7))
            for c in range(3)]
    want = torch.cat(sent)
    want = want / want.norm(dim=1, keepdim=True).clamp(min=1.0)
    torch.testing.assert_close(private.bank.entries, want)
    assert not torch.allclose(private.bank.entries, plain.bank.entries, atol=0.1)


def test_dp_uploads_change_the_global_state_and_skip_usage_counts():
    plain, private = simulate("omnifm", 1), simulate("omnifm", 1, dp_clip=0.5, dp_noise=1.0)
    assert any(not torch.equal(plain.global_state[k], private.global_state[k]) for k in plain.global_state)
    # no retrieval counts were sent: the bank's usage record is the one it was seeded with
    fresh = Simulation(FLConfig(strategy="omnifm", rounds=1, dp_clip=0.5, dp_noise=1.0, **TINY), progress=False)
    fresh.seed_bank()
    assert torch.equal(private.bank.freq[:len(fresh.bank)], fresh.bank.freq)
