import dataclasses
import json
import math
import os
import pickle
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from omnifm.fl import FLConfig, Simulation, dirichlet_label_skew, sample_participants
from omnifm.fl.client import Update, load_state
from omnifm.fl.report import table
from omnifm.fl.strategies import STRATEGIES, FedAvg

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(clients=3, participation=0.67, samples_per_client=24, image_size=16, width=0.125, local_epochs=1,
            batch_size=8)


def simulate(strategy, rounds, out_dir=None, *, resume=False, **overrides):
    sim = Simulation(FLConfig(strategy=strategy, rounds=rounds, **{**TINY, **overrides}),
                     out_dir and str(out_dir), progress=False)
    sim.run(resume=resume)
    return sim


def flatten(obj, path=()):
    """(path, leaf) pairs of nested dicts, lists and tuples; each container also yields its
    type and keys, so a missing or extra entry is a difference too."""
    if isinstance(obj, dict):
        yield path, ("dict", sorted(map(str, obj)))
        for k, v in obj.items():
            yield from flatten(v, path + (str(k),))
    elif isinstance(obj, (list, tuple)):
        yield path, (type(obj).__name__, len(obj))
        for i, v in enumerate(obj):
            yield from flatten(v, path + (i,))
    else:
        yield path, obj


def full_state(sim):
    """Everything a run leaves behind, {path: leaf}: the shared weights, the strategy's
    state_dict and every attribute (state it forgets to save shows up there), the bank,
    each client's local state and extra, and every metrics field but wall-clock time."""
    bank = None if sim.bank is None else {k: getattr(sim.bank, k) for k in ("entries", "owners", "freq", "age")}
    return dict(flatten({"next_round": sim.next_round, "global": sim.global_state,
                         "strategy": sim.strategy.state_dict(), "strategy attributes": vars(sim.strategy),
                         "bank": bank, "clients": [{"local": c.local_state, "extra": c.extra} for c in sim.clients],
                         "history": [{k: v for k, v in row.items() if k != "seconds"} for row in sim.history]}))


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def show(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "dict":  # flatten's key markers
        return f"keys only in the first: {sorted(set(a[1]) - set(b[1]))}, only in the second: " \
            f"{sorted(set(b[1]) - set(a[1]))}"
    one = [f"tensor{tuple(x.shape)} {x.dtype} sum={x.double().sum().item():.6g}" if isinstance(x, torch.Tensor)
           else repr(x) for x in (a, b)]
    return " != ".join(one)


def assert_same_state(a, b):
    """Exactly equal full states (bitwise tensors); the message names the first difference.
    A container's keys come before its entries, so every path reached exists in both."""
    sa, sb = full_state(a), full_state(b)
    for path, x in sa.items():
        assert same(x, sb[path]), f"first difference at {'/'.join(map(str, path))}: {show(x, sb[path])}"


def test_state_comparison_sees_every_part():
    """The comparison is not vacuous: a change anywhere in the state is named."""
    def fresh():
        sim = Simulation(FLConfig(strategy="omnifm", rounds=1, **TINY), progress=False)
        sim.seed_bank()
        sim.history = [{"round": 1, "accuracy": 0.5, "loss": float("nan"), "seconds": 1.0, "clients": [0, 2]}]
        sim.clients[1].extra = {"c": {"w": torch.zeros(3)}}
        return sim

    a = fresh()
    b = fresh()
    b.history[0]["seconds"] = 2.0  # wall-clock time is not state
    assert_same_state(a, b)
    edits = {"global/": lambda s: next(iter(s.global_state.values())).view(-1)[0].add_(1e-6),
             "strategy attributes/hp": lambda s: s.strategy.hp.update(lam=0.2),
             "bank/freq": lambda s: s.bank.freq.__setitem__(0, 0.5),
             "bank/entries": lambda s: setattr(s.bank, "entries", s.bank.entries.double()),
             "clients/2/local": lambda s: next(iter(s.clients[2].local_state.values())).view(-1)[0].add_(1),
             "clients/1/extra/c/w": lambda s: s.clients[1].extra["c"]["w"].add_(1),
             "clients/0/extra": lambda s: s.clients[0].extra.update(prev={}),
             "history/0/accuracy": lambda s: s.history[0].update(accuracy=0.25),
             "history/0/clients": lambda s: s.history[0]["clients"].append(1),
             "history/0/loss": lambda s: s.history[0].update(loss=1.0),
             "next_round": lambda s: setattr(s, "next_round", 1)}
    for where, edit in edits.items():
        b = fresh()
        edit(b)
        with pytest.raises(AssertionError, match=f"at {where}"):
            assert_same_state(a, b)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_same_seed_same_state(strategy):
    a = simulate(strategy, 2)
    assert all(row["rejected"] == [] for row in a.history)  # a healthy run: every participant trained
    assert_same_state(a, simulate(strategy, 2))


def metrics_file(out_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_resume_equals_uninterrupted(strategy, tmp_path):
    full = simulate(strategy, 3, tmp_path / "full")
    cut = simulate(strategy, 2, tmp_path / "cut")
    reloaded = Simulation(FLConfig(strategy=strategy, rounds=3, **TINY), str(tmp_path / "cut"), progress=False)
    reloaded.resume()
    assert_same_state(reloaded, cut)  # the checkpoint holds the whole state
    resumed = simulate(strategy, 3, tmp_path / "cut", resume=True)
    assert_same_state(resumed, full)
    # The metrics file is rewritten from the checkpoint's history: every field of every round.
    rows, expected = dict(flatten(metrics_file(tmp_path / "cut"))), dict(flatten(metrics_file(tmp_path / "full")))
    assert [v for k, v in rows.items() if k[1:] == ("round",)] == [1, 2, 3]
    assert rows.keys() == expected.keys() and all(same(v, expected[k]) for k, v in rows.items())
    assert not (tmp_path / "cut" / "checkpoint.pt.tmp").exists()


def test_resume_refuses_other_settings(tmp_path):
    Simulation(FLConfig(strategy="fedavg", rounds=1, **TINY), str(tmp_path), progress=False).run()
    other = Simulation(FLConfig(strategy="fedavg", rounds=2, **{**TINY, "lr": 0.5}), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="lr"):
        other.run(resume=True)


class RunsCode:
    """Unpickling this runs code: it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_unreadable_or_foreign_checkpoints(tmp_path):
    sim = simulate("fedavg", 1, tmp_path)
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    marker = tmp_path / "code_ran"
    state = sim.state_dict()
    with_code = {**state, "history": [RunsCode(marker)]}
    wrong_model = {**state, "global": {k: v for k, v in list(state["global"].items())[1:]}}
    writers = {"a pickle that runs code": lambda: path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2)),
               "a checkpoint holding such an object": lambda: torch.save(with_code, path),
               "truncated": lambda: path.write_bytes(good[:len(good) // 2]),
               "empty": lambda: path.write_bytes(b""),
               "random bytes": lambda: path.write_bytes(
                   torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                 dtype=torch.uint8).numpy().tobytes()),
               "a foreign state": lambda: torch.save({"weight": torch.ones(2)}, path),
               "a plain list": lambda: torch.save([1, 2], path),
               "another model": lambda: torch.save(wrong_model, path)}
    for name, write in writers.items():
        write()
        fresh = Simulation(FLConfig(strategy="fedavg", rounds=2, **TINY), str(tmp_path), progress=False)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            fresh.resume()
        assert not marker.exists(), f"loading {name} ran code"
        assert fresh.next_round == 0 and fresh.history == [], f"{name} was partly loaded"
    path.write_bytes(good)  # the real checkpoint still loads
    fresh = Simulation(FLConfig(strategy="fedavg", rounds=2, **TINY), str(tmp_path), progress=False)
    fresh.resume()
    assert_same_state(fresh, sim)


class Corrupting(FedAvg):
    """Client 0 sends NaN weights, client 1 a wrong shape, client 2 crashes."""

    def client_train(self, client, model, global_state, ctx):
        update = super().client_train(client, model, global_state, ctx)
        key = next(k for k, v in update.weights.items() if v.is_floating_point())
        if client.cid == 0:
            update.weights[key] = torch.full_like(update.weights[key], float("nan"))
        elif client.cid == 1:
            update.weights[key] = update.weights[key][:1]
        else:
            raise RuntimeError("disk full")
        return update


def test_corrupt_updates_never_touch_the_server_state():
    logs = []
    sim = Simulation(FLConfig(strategy="fedavg", rounds=1, **{**TINY, "participation": 1.0}), progress=False,
                     log=logs.append)
    sim.strategy = Corrupting(share_bn_stats=False)
    before = {k: v.clone() for k, v in sim.global_state.items()}
    row = sim.run()[-1]
    assert row["rejected"] == [0, 1, 2] and len(logs) == 4 and not row["aggregated"]
    assert "not finite" in logs[0] and "shape" in logs[1] and "disk full" in logs[2] and "0 usable" in logs[3]
    assert all(torch.equal(before[k], v) for k, v in sim.global_state.items())


class FailingFirstRound(FedAvg):
    """Client 0 crashes in round 0; every other reply is healthy."""

    def client_train(self, client, model, global_state, ctx):
        if client.cid == 0 and ctx.round == 0:
            raise RuntimeError("node lost")
        return super().client_train(client, model, global_state, ctx)


def test_too_few_replies_are_not_aggregated():
    logs = []
    cfg = FLConfig(strategy="fedavg", rounds=2, min_clients=3, **{**TINY, "participation": 1.0})
    sim = Simulation(cfg, progress=False, log=logs.append)
    sim.strategy = FailingFirstRound(share_bn_stats=False)
    before = {k: v.clone() for k, v in sim.global_state.items()}
    sim.run_round(0)
    assert all(torch.equal(before[k], v) for k, v in sim.global_state.items())  # 2 of 3: kept
    assert "2 usable updates, fewer than min_clients=3; not aggregated" in logs[-1]
    row = sim.run_round(1)  # all three reply: aggregated
    assert row["aggregated"] and any(not torch.equal(before[k], v) for k, v in sim.global_state.items())
    with pytest.raises(ValueError, match="min_clients: 3 is more than the 2 clients a round draws"):
        FLConfig(min_clients=3, **{**TINY, "participation": 0.67})


class SlowClient(FedAvg):
    """Client 1 takes 1.1 s a step (a hospital on a slow or hung machine); client 2
    raises instead when asked to (the reference for "skipped")."""

    def __init__(self, *, fail_instead=False, **kw):
        super().__init__(**kw)
        self.fail_instead = fail_instead

    def client_train(self, client, model, global_state, ctx):
        if client.cid == 1 and self.fail_instead:
            raise RuntimeError("gone")
        return super().client_train(client, model, global_state, ctx)

    def objective(self, client, model, ctx, global_state):
        loss_of = super().objective(client, model, ctx, global_state)

        def slow(x, y):
            if client.cid == 1:
                time.sleep(1.1)
            return loss_of(x, y)
        return slow


def test_a_client_past_its_time_limit_is_cut_off_and_skipped():
    """--client-timeout: the slow client is stopped between steps (after 2 of its
    steps, not all), logged, and the round aggregates the others: the same global
    state as a round in which that client failed outright."""
    cfg = FLConfig(strategy="fedavg", rounds=1, client_timeout=2.0, **{**TINY, "participation": 1.0})
    logs = []
    slow = Simulation(cfg, progress=False, log=logs.append)
    slow.strategy = SlowClient(share_bn_stats=False)
    t0 = time.monotonic()
    row = slow.run_round(0)
    assert time.monotonic() - t0 < 3 * 1.1 + 2.0  # cut off, not run to its end (3 steps of 1.1 s)
    assert row["rejected"] == [1] and row["aggregated"]
    assert any("client 1 failed (ClientTimeout: client 1: local training passed its time limit after 2 steps)" in m
               for m in logs), logs
    failed = Simulation(dataclasses.replace(cfg, client_timeout=0.0), progress=False, log=lambda m: None)
    failed.strategy = SlowClient(share_bn_stats=False, fail_instead=True)
    failed.run_round(0)
    for k, v in failed.global_state.items():
        assert torch.equal(slow.global_state[k], v), k
    with pytest.raises(ValueError, match="client_timeout: expected a number >= 0"):
        FLConfig(client_timeout=-1.0)


def test_bad_bank_payloads_are_rejected():
    from omnifm.fl.strategies import OmniFM

    class BadCounts(OmniFM):
        def client_train(self, client, model, global_state, ctx):
            update = super().client_train(client, model, global_state, ctx)
            if client.cid % 2 == 0:
                update.retrieval_counts = update.retrieval_counts[:-1]
            else:
                update.bank_upload = update.bank_upload[:, :3]
            return update

    logs = []
    sim = Simulation(FLConfig(strategy="omnifm", rounds=1, **{**TINY, "participation": 0.67}), progress=False,
                     log=logs.append)
    sim.strategy = BadCounts(head_prefix="backbone.fc.")
    sim.seed_bank()
    bank_before = sim.bank.state_dict()
    row = sim.run_round(0)
    assert row["rejected"] == row["clients"] and len(logs) == 3 and "not aggregated" in logs[2]
    for cid, line in zip(row["clients"], logs):
        assert ("retrieval counts" if cid % 2 == 0 else "bank upload") in line
    assert all(torch.equal(bank_before[k], v) for k, v in sim.bank.state_dict().items())


def byzantine_round(attack):
    """One OmniFM round, 5 clients: with attack=True client 0 sends a change 1e6 times too
    large, client 1 NaN prototypes, client 2 a copy claiming to be client 3; with
    attack=False those three fail instead. The honest clients are 3 and 4."""
    from omnifm.fl.strategies import OmniFM

    class Byzantine(OmniFM):
        def client_train(self, client, model, global_state, ctx):
            if client.cid < 3 and not attack:
                raise RuntimeError("offline")
            update = super().client_train(client, model, global_state, ctx)
            if client.cid == 0:
                update.weights = {k: global_state[k] + 1e6 * (w - global_state[k]) if w.is_floating_point() else w
                                  for k, w in update.weights.items()}
            elif client.cid == 1:
                update.bank_upload = torch.full_like(update.bank_upload, float("nan"))
            elif client.cid == 2:
                update.client = 3
            return update

    logs = []
    cfg = FLConfig(strategy="omnifm", rounds=1, **{**TINY, "clients": 5, "participation": 1.0})
    sim = Simulation(cfg, progress=False, log=logs.append)
    sim.strategy = Byzantine(head_prefix="backbone.fc.")
    sim.seed_bank()
    row = sim.run_round(0)
    return sim, row, logs


def test_byzantine_uploads_change_nothing_the_honest_clients_see():
    attacked, row, logs = byzantine_round(attack=True)
    clean, clean_row, _ = byzantine_round(attack=False)
    assert sorted(row["rejected"]) == [0, 1, 2] == sorted(clean_row["rejected"])
    assert any("client 0 rejected: its change is over 100x" in line for line in logs)
    assert any("client 1 rejected: its bank upload" in line for line in logs)
    assert any("client 2 rejected: it claims to be client 3" in line for line in logs)
    a, b = attacked.state_dict(), clean.state_dict()
    for part in ("global", "bank"):
        assert all(same(x, y) for (_, x), (_, y) in zip(flatten(a[part]), flatten(b[part]))), part
    # so the honest clients retrieve the same prototypes from the bank
    for sim in (attacked, clean):
        load_state(sim.model, *sim.strategy.eval_state(sim.clients[3], sim.global_state))
        sim.model.set_bank(sim.bank.entries)
    x = attacked.clients[3].test.tensors[0][:4]
    s = attacked.model.spectral_tokens(x)
    assert torch.equal(attacked.model.retrieve(s), clean.model.retrieve(s))


def test_partitioners():
    labels = np.repeat(np.arange(5), 40)
    parts = dirichlet_label_skew(labels, 4, 0.1, seed=1, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))  # a partition
    assert all(len(p) >= 5 for p in parts)
    again = dirichlet_label_skew(labels, 4, 0.1, seed=1, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    skew = np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])
    even = np.mean([np.bincount(labels[p], minlength=5).max() / len(p)
                    for p in dirichlet_label_skew(labels, 4, 100.0, seed=1)])
    assert skew > even  # gamma=0.1 concentrates labels more than gamma=100
    assert sample_participants(10, 0.2, 3, seed=0) == sample_participants(10, 0.2, 3, seed=0)
    assert len(sample_participants(10, 0.2, 0)) == 2 and len(sample_participants(3, 0.01, 0)) == 1
    with pytest.raises(ValueError, match="gamma"):
        dirichlet_label_skew(labels, 4, 0.0)
    with pytest.raises(ValueError, match="ratio"):
        sample_participants(10, 1.5, 0)


def write_medmnist(root, flag, n_classes, channels, n=12, size=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "val", "test"):
        shape = (n, size, size) if channels == 1 else (n, size, size, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, n_classes, (n, 1))
    np.savez(os.path.join(root, f"{flag}.npz"), **arrays)
    return arrays


def test_medmnist_loader_on_written_files(tmp_path):
    from omnifm.data.medmnist_npz import load_cross_modality, load_npz

    arrays = write_medmnist(tmp_path, "pathmnist", 9, 3)
    write_medmnist(tmp_path, "dermamnist", 7, 3, seed=1)
    write_medmnist(tmp_path, "bloodmnist", 8, 3, seed=2)
    x, y = load_npz(str(tmp_path), "pathmnist", "train")
    assert x.shape == (12, 3, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[3].permute(1, 2, 0), torch.from_numpy(arrays["train_images"][3] / 255.0).float())
    assert torch.equal(y, torch.from_numpy(arrays["train_labels"][:, 0]))
    xs, ys, mods, names = load_cross_modality(str(tmp_path), "test")
    assert len(names) == 24 and xs.shape[0] == 36 and ys.max() < 24
    assert (ys[mods == 1] >= 9).all() and (ys[mods == 2] >= 16).all()  # label offsets
    with pytest.raises(FileNotFoundError, match="data_root"):
        load_npz(str(tmp_path), "chestmnist", "train")
    with pytest.raises(ValueError, match="split"):
        load_npz(str(tmp_path), "pathmnist", "dev")
    # A file that is not a MedMNIST archive is refused, naming it
    path = tmp_path / "pathmnist.npz"
    bad = {b"": "not a readable .npz file", os.urandom(256): "not a readable .npz file"}
    for content, message in bad.items():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
            load_npz(str(tmp_path), "pathmnist", "train")
    np.savez(path, images=arrays["train_images"])
    with pytest.raises(ValueError, match=re.escape(f"{path}: no train_images, train_labels (it has images)")):
        load_npz(str(tmp_path), "pathmnist", "train")
    np.savez(path, train_images=arrays["train_images"], train_labels=arrays["train_labels"][:5])
    with pytest.raises(ValueError, match=re.escape(f"{path}: 12 train_images but 5 train_labels")):
        load_npz(str(tmp_path), "pathmnist", "train")
    np.savez(path, train_images=arrays["train_images"][..., 0], train_labels=arrays["train_labels"])
    with pytest.raises(ValueError, match=re.escape(f"{path}: train_images has shape (12, 28, 28)")):
        load_npz(str(tmp_path), "pathmnist", "train")
    np.savez(path, train_images=arrays["train_images"], train_labels=arrays["train_labels"] + 9)
    with pytest.raises(ValueError, match=re.escape(f"{path}: labels outside [0, 9)")):
        load_npz(str(tmp_path), "pathmnist", "train")
    np.save(tmp_path / "one.npy", arrays["train_images"])
    os.replace(tmp_path / "one.npy", path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: holds one array")):
        load_npz(str(tmp_path), "pathmnist", "train")
    np.savez(path, **arrays)
    # A federation on them runs end to end.
    cfg = FLConfig(strategy="fedper", data="medmnist", data_root=str(tmp_path), scenario="extra", rounds=1,
                   **{**TINY, "image_size": 28, "samples_per_client": 12})
    assert len(Simulation(cfg, progress=False).run()) == 1
    # Real data is not capped unless asked: 3 clients (one per modality) share all 36 + 36 images
    whole = Simulation(dataclasses.replace(cfg, samples_per_client=None), progress=False)
    assert sum(len(c.train) + len(c.test) for c in whole.clients) == 72
    assert sum(len(c.train) + len(c.test) for c in Simulation(cfg, progress=False).clients) == 36


def test_cli_train_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "omnifm.cli", "train", "--strategy", "omnifm,fedavg", "--rounds", "2",
           "--clients", "3", "--participation", "0.67", "--samples-per-client", "24", "--image-size", "16",
           "--width", "0.125", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as one_thread: tiny models, and a busy machine
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| omnifm | 2 |" in res.stdout and "| fedavg | 2 |" in res.stdout
    rows = [json.loads(x) for x in (out / "omnifm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert {"accuracy", "f1", "loss", "seconds", "bytes_up", "bytes_down"} <= set(rows[0])
    assert (out / "curves.png").stat().st_size > 0 and (out / "results.md").exists()
    # --resume continues from the checkpoints to more rounds.
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "train", "--resume", str(out), "--rounds", "3"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| omnifm | 3 |" in res.stdout


def test_evaluation_is_sample_weighted():
    """Each metric is the mean over clients weighted by their held-out sizes."""
    from torch.utils.data import TensorDataset

    sim = Simulation(FLConfig(strategy="fedavg", rounds=1, **TINY), progress=False)
    sizes, scores = (2, 3, 5), (0.1, 0.4, 0.9)
    for c, n in zip(sim.clients, sizes):
        c.test = TensorDataset(c.test.tensors[0][:1].repeat(n, 1, 1, 1), c.test.tensors[1][:1].repeat(n))
    per_client = dict(zip((len(c.test) for c in sim.clients), scores))
    sim.task.evaluate = lambda model, dataset: {"accuracy": per_client[len(dataset)], "f1": 1.0}
    got = sim.evaluate()
    assert got["accuracy"] == pytest.approx((2 * 0.1 + 3 * 0.4 + 5 * 0.9) / 10) and got["f1"] == pytest.approx(1.0)


def test_eval_every_and_eval_clients():
    seen = []
    sim = Simulation(FLConfig(strategy="fedavg", rounds=5, eval_every=2, eval_clients=2,
                              **{**TINY, "clients": 4, "participation": 0.5}), progress=False)
    real = sim.task.evaluate
    sim.task.evaluate = lambda model, dataset: seen.append(id(dataset)) or real(model, dataset)
    rows = sim.run()
    assert [("accuracy" in r) for r in rows] == [False, True, False, True, True]  # every 2nd, and the last
    assert len(seen) == 6  # two clients per evaluation
    ids = {id(c.test): c.cid for c in sim.clients}
    samples = [sorted(ids[i] for i in seen[k:k + 2]) for k in (0, 2, 4)]
    assert samples == [[c.cid for c in sim.eval_sample(r)] for r in (1, 3, 4)] and len({tuple(x) for x in samples}) > 1
    text = table({"fedavg": rows})
    assert f"| fedavg | 5 | {rows[-1]['accuracy']:.4f} |" in text


def test_evaluation_weights_each_metric_by_its_own_samples():
    """A metric about a subset (VQA's open questions) is weighted by that subset; a
    client with none of it (weight 0, value NaN) stays out; no client at all: NaN."""
    sim = Simulation(FLConfig(strategy="fedavg", rounds=1, **TINY), progress=False)
    values = iter([{"accuracy": 0.2, "f1": math.nan}, {"accuracy": 0.5, "f1": 0.4}, {"accuracy": 0.8, "f1": 0.7}])
    weights = iter([{"accuracy": 1, "f1": 0}, {"accuracy": 3, "f1": 2}, {"accuracy": 0, "f1": 6}])
    sim.task.evaluate = lambda model, dataset: next(values)
    sim.task.metric_weights = lambda dataset: next(weights)
    got = sim.evaluate()
    assert got["accuracy"] == pytest.approx((0.2 + 3 * 0.5) / 4) and got["f1"] == pytest.approx((2 * 0.4 + 6 * 0.7) / 8)
    sim.task.evaluate = lambda model, dataset: {"accuracy": math.nan, "f1": 0.5}
    sim.task.metric_weights = lambda dataset: {"accuracy": 0, "f1": 1}
    got = sim.evaluate()
    assert math.isnan(got["accuracy"]) and got["f1"] == pytest.approx(0.5)


def test_an_update_that_stands_for_several_clients_counts_them_all(monkeypatch):
    """A secure aggregate (one Update for the round's participants) counts as its
    contributors toward min_clients, and its weights become the global state (FedAvg
    of one update)."""
    cfg = FLConfig(strategy="fedavg", rounds=1, **{**TINY, "clients": 4, "participation": 1.0, "min_clients": 3})
    for contributors, aggregated in ((3, True), (2, False)):
        sim = Simulation(cfg, progress=False)
        before = sim.global_state
        moved = {k: v + 0.5 if v.is_floating_point() else v for k, v in before.items()}
        monkeypatch.setattr(sim, "client_updates",
                            lambda r, p, c=contributors: {-1: Update(-1, 40, moved, 0.25, contributors=c)})
        row = sim.run_round(0)
        assert row["aggregated"] is aggregated and row["loss"] == 0.25
        for k in before:
            assert torch.equal(sim.global_state[k], moved[k] if aggregated else before[k]), k
