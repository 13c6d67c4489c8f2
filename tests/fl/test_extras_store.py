"""Clients' strategy state past a memory budget (ExtrasStore): the same results as with
everything in memory, the budget kept, exact resume, and files that are checked."""
import os

import pytest
import torch

from omnifm.fl import FLConfig, Simulation
from omnifm.fl.client import tensor_bytes
from omnifm.fl.extras_store import OnDisk
from omnifm.fl.simulation import read_checkpoint

TINY = dict(clients=4, participation=0.5, samples_per_client=24, image_size=16, width=0.125, local_epochs=1,
            batch_size=8)
ALL_ON_DISK = 1e-6  # MB: every client's extras are spilled as soon as it is done


def run(strategy, rounds=3, out_dir=None, resume=False, **over):
    sim = Simulation(FLConfig(strategy=strategy, rounds=rounds, **{**TINY, **over}), out_dir and str(out_dir),
                     progress=False)
    return sim, sim.run(resume=resume)


def assert_same_run(a, b):
    (sim_a, hist_a), (sim_b, hist_b) = a, b
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in hist_a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in hist_b]
    for k, v in sim_a.global_state.items():
        assert torch.equal(v, sim_b.global_state[k]), k


@pytest.mark.parametrize("strategy", ["ditto", "moon", "scaffold", "feddyn"])
def test_spilled_extras_give_the_same_run(strategy, tmp_path):
    spilled = run(strategy, out_dir=tmp_path, extras_budget_mb=ALL_ON_DISK)
    assert_same_run(run(strategy), spilled)
    sim = spilled[0]
    assert sim.extras.bytes_in_memory() == 0
    assert any(isinstance(c.extra, OnDisk) for c in sim.clients)


def test_budget_is_kept_between_clients(tmp_path, monkeypatch):
    """With room for about two clients' personal models, at most that much stays in
    memory after every client is done, and the run is still the same."""
    probe, _ = run("ditto", rounds=1)
    one = max(tensor_bytes(c.extra) for c in probe.clients)
    budget_mb = 2.5 * one / 2**20
    sim = Simulation(FLConfig(strategy="ditto", rounds=3, extras_budget_mb=budget_mb, **TINY), str(tmp_path),
                     progress=False)
    seen = []
    release = sim.extras.release

    def checked_release(client):
        release(client)
        seen.append(sim.extras.bytes_in_memory())

    monkeypatch.setattr(sim.extras, "release", checked_release)
    history = sim.run()
    assert seen and max(seen) <= budget_mb * 2**20 and max(seen) >= one  # kept some, within the budget
    assert_same_run(run("ditto"), (sim, history))


def test_on_disk_extras_refuse_access(tmp_path):
    sim, _ = run("ditto", rounds=1, out_dir=tmp_path, extras_budget_mb=ALL_ON_DISK)
    spilled = next(c for c in sim.clients if isinstance(c.extra, OnDisk))
    with pytest.raises(RuntimeError, match="on disk"):
        spilled.extra["personal"]
    sim.extras.use(spilled)
    assert set(spilled.extra) == {"personal"}


def test_checkpoint_names_the_extras_and_resume_is_exact(tmp_path):
    """2 rounds, then resumed to 3, equals 3 rounds straight; the checkpoint holds no
    client extras (each is a file of the round's snapshot) and older snapshots go."""
    cut = tmp_path / "cut"
    run("ditto", rounds=2, out_dir=cut, extras_budget_mb=ALL_ON_DISK)
    state = read_checkpoint(cut / "checkpoint.pt")
    assert all(c["extra"] == {} and c["extra_file"].startswith("extras") for c in state["clients"])
    assert os.listdir(cut / "extras") == ["r000002"]
    resumed = run("ditto", rounds=3, out_dir=cut, resume=True, extras_budget_mb=ALL_ON_DISK)
    assert os.listdir(cut / "extras") == ["r000003"]
    assert_same_run(run("ditto"), resumed)
    # a run without a budget reads the same checkpoint's extras back into memory
    again = tmp_path / "again"
    run("ditto", rounds=2, out_dir=again, extras_budget_mb=ALL_ON_DISK)
    assert_same_run(run("ditto"), run("ditto", rounds=3, out_dir=again, resume=True))
    # and a checkpoint without a budget, resumed with one, spills its inline extras at once
    inline = tmp_path / "inline"
    run("ditto", rounds=2, out_dir=inline)
    sim = Simulation(FLConfig(strategy="ditto", rounds=3, extras_budget_mb=ALL_ON_DISK, **TINY), str(inline),
                     progress=False)
    sim.resume()
    assert sim.extras.bytes_in_memory() == 0
    assert_same_run(run("ditto"), (sim, sim.run(resume=True)))


def test_damaged_or_foreign_extras_files_are_refused(tmp_path):
    run("ditto", rounds=2, out_dir=tmp_path, extras_budget_mb=ALL_ON_DISK)
    path = tmp_path / "extras" / "r000002" / "client000001.pt"
    path.write_bytes(path.read_bytes()[:100])
    sim = Simulation(FLConfig(strategy="ditto", rounds=3, extras_budget_mb=ALL_ON_DISK, **TINY), str(tmp_path),
                     progress=False)
    with pytest.raises(ValueError, match="client000001.pt"):
        sim.run(resume=True)

    other = tmp_path / "other"
    run("ditto", rounds=2, out_dir=other, extras_budget_mb=ALL_ON_DISK)
    state = read_checkpoint(other / "checkpoint.pt")
    state["clients"][0]["extra_file"] = "../checkpoint.pt"
    torch.save(state, other / "checkpoint.pt")
    with pytest.raises(ValueError, match="outside"):
        run("ditto", rounds=3, out_dir=other, resume=True)


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="extras_budget_mb"):
        FLConfig(strategy="ditto", extras_budget_mb=-1.0, **TINY)
