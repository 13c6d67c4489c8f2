import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from omnifm.fl import FLConfig, Simulation, dirichlet_label_skew, sample_participants
from omnifm.fl.strategies import FedAvg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(clients=3, participation=0.67, samples_per_client=24, image_size=16, width=0.125, local_epochs=1,
            batch_size=8)


def metrics(history):
    return [(r["accuracy"], r["f1"], r["loss"], r["bytes_up"]) for r in history]


@pytest.mark.parametrize("strategy", ["omnifm", "fedavg"])
def test_same_seed_same_metrics(strategy):
    a = Simulation(FLConfig(strategy=strategy, rounds=2, **TINY), progress=False).run()
    b = Simulation(FLConfig(strategy=strategy, rounds=2, **TINY), progress=False).run()
    assert metrics(a) == metrics(b)


@pytest.mark.parametrize("strategy", ["omnifm", "scaffold", "ditto"])
def test_resume_equals_uninterrupted(strategy, tmp_path):
    full = Simulation(FLConfig(strategy=strategy, rounds=3, **TINY), str(tmp_path / "full"), progress=False).run()
    Simulation(FLConfig(strategy=strategy, rounds=2, **TINY), str(tmp_path / "cut"), progress=False).run()
    resumed = Simulation(FLConfig(strategy=strategy, rounds=3, **TINY), str(tmp_path / "cut"), progress=False)
    history = resumed.run(resume=True)
    assert metrics(history) == metrics(full)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    assert not (tmp_path / "cut" / "checkpoint.pt.tmp").exists()


def test_resume_refuses_other_settings(tmp_path):
    Simulation(FLConfig(strategy="fedavg", rounds=1, **TINY), str(tmp_path), progress=False).run()
    other = Simulation(FLConfig(strategy="fedavg", rounds=2, **{**TINY, "lr": 0.5}), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="lr"):
        other.run(resume=True)


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
    assert row["rejected"] == [0, 1, 2] and len(logs) == 3
    assert "not finite" in logs[0] and "shape" in logs[1] and "disk full" in logs[2]
    assert all(torch.equal(before[k], v) for k, v in sim.global_state.items())


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
    assert row["rejected"] == row["clients"] and len(logs) == 2
    for cid, line in zip(row["clients"], logs):
        assert ("retrieval counts" if cid % 2 == 0 else "bank upload") in line
    assert all(torch.equal(bank_before[k], v) for k, v in sim.bank.state_dict().items())


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
    # A federation on them runs end to end.
    cfg = FLConfig(strategy="fedper", data="medmnist", data_root=str(tmp_path), scenario="extra", rounds=1,
                   **{**TINY, "image_size": 28, "samples_per_client": 12})
    assert len(Simulation(cfg, progress=False).run()) == 1


def test_cli_train_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "omnifm.cli", "train", "--strategy", "omnifm,fedavg", "--rounds", "2",
           "--clients", "3", "--participation", "0.67", "--samples-per-client", "24", "--image-size", "16",
           "--width", "0.125", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| omnifm | 2 |" in res.stdout and "| fedavg | 2 |" in res.stdout
    rows = [json.loads(x) for x in (out / "omnifm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert {"accuracy", "f1", "loss", "seconds", "bytes_up", "bytes_down"} <= set(rows[0])
    assert (out / "curves.png").stat().st_size > 0 and (out / "results.md").exists()
    # --resume continues from the checkpoints to more rounds.
    res = subprocess.run([sys.executable, "-m", "omnifm.cli", "train", "--resume", str(out), "--rounds", "3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| omnifm | 3 |" in res.stdout
