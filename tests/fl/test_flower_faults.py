"""Faults and resume on Flower, each with its own SuperLink and SuperNodes (a module of
its own: the loopback federations of test_flower.py are shut down before these start,
so their idle processes do not slow these rounds past their timeouts)."""
import os
import signal

import pytest
import torch

pytest.importorskip("flwr")

from omnifm.fl import FLConfig, Simulation  # noqa: E402
from tests.fl.test_flower import TINY, WAIT, launch, logs, result, submit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # two runs, about two minutes here: OMNIFM_SLOW=1 runs it
def test_a_resumed_flower_run_continues_exactly(tmp_path):
    """FedPer (a private head on every node) for one round, then a new run with
    resume=true and two rounds: the server continues from server.pt and each node from
    the client state it saved in its state-dir (a new run starts with an empty
    context.state). The result equals two rounds in process: global state and the
    personalised metrics, which read the private heads."""
    with launch(tmp_path, state_dirs=True) as (tmp, env, _):
        submit(tmp, env, "fedper", name="resumed")
        first = result(tmp, "resumed", rounds=1)
        submit(tmp, env, "fedper", name="resumed", rounds=2, resume=True)
        flower = result(tmp, "resumed", rounds=2)
    assert flower["history"][0] == first["history"][0]  # round 0 was not run again (its timing is kept)
    sim = Simulation(FLConfig(strategy="fedper", **{**TINY, "rounds": 2}), progress=False)
    history = sim.run()
    for k, v in sim.global_state.items():
        torch.testing.assert_close(flower["global"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for name in sim.task.metrics:
        assert flower["history"][1][name] == pytest.approx(history[1][name], rel=1e-5, nan_ok=True), name
    assert sorted(p.name[-11:] for p in (tmp / "node0").iterdir()) == ["-r000000.pt", "-r000001.pt"]


@pytest.mark.slow  # minutes, and its timing can fail on a loaded machine: OMNIFM_SLOW=1 runs it
def test_a_supernode_lost_mid_run_is_skipped(tmp_path):
    """Hospital 2's SuperNode dies (SIGKILL, with its ClientApp) as round 2 begins: the
    server waits out its timeout, logs it, aggregates the other two and evaluates
    without it; the run ends normally."""
    timeout = 20.0
    with launch(tmp_path) as (tmp, env, procs):
        submit(tmp, env, "fedavg", rounds=2, timeout=timeout)
        first = result(tmp, "fedavg", rounds=1)
        os.killpg(procs[3].pid, signal.SIGKILL)
        procs[3].wait(timeout=10)
        final = result(tmp, "fedavg", rounds=2, wait=WAIT + 3 * timeout)
    assert [h["aggregated"] for h in final["history"]] == [True, True], logs(tmp)
    assert 2 not in first["history"][0]["rejected"] and 2 in final["history"][1]["rejected"], logs(tmp)
    assert not all(torch.equal(final["global"][k], v) for k, v in first["global"].items())  # round 2 did update
    assert final["history"][1]["accuracy"] == final["history"][1]["accuracy"]  # evaluated, not NaN
