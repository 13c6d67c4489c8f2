"""omnifm on Flower: record conversions, and one round on a real SuperLink with three
SuperNodes against the same round in process."""
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")

from omnifm.fl import FLConfig, Simulation  # noqa: E402
from omnifm.fl.client import Update  # noqa: E402
from omnifm.fl.flower import (_keep, _saved_state, config_from, to_record, to_tensors,  # noqa: E402
                              update_from_records, update_to_records)
from omnifm.fl.simulation import read_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
TINY = dict(clients=3, participation=1.0, rounds=1, samples_per_client=24, image_size=16, width=0.125,
            local_epochs=1, batch_size=8)
WAIT = 100.0  # seconds for a run (three rounds of ClientApp processes, each importing torch and monai)


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_state_dict_round_trip_is_exact():
    state = {"w": torch.randn(3, 4), "n": torch.tensor(7), "idx": torch.arange(5, dtype=torch.int32),
             "empty": torch.zeros(0, 8), "half": torch.randn(2).double()}
    assert_same(to_tensors(to_record(state)), state)


def test_update_round_trip_is_exact():
    update = Update(2, 24, {"a.weight": torch.randn(2, 2), "a.num_batches_tracked": torch.tensor(3)}, 0.75,
                    extra={"delta_c": {"a.weight": torch.randn(2, 2)}}, bank_upload=torch.randn(4, 8),
                    retrieval_counts=torch.tensor([0, 5, 1], dtype=torch.int64))
    back = update_from_records(update_to_records(update))
    assert (back.client, back.n_samples, back.loss) == (2, 24, 0.75)
    assert_same(back.weights, update.weights)
    assert_same(back.extra["delta_c"], update.extra["delta_c"]) and set(back.extra) == {"delta_c"}
    assert_same({"u": back.bank_upload, "c": back.retrieval_counts},
                {"u": update.bank_upload, "c": update.retrieval_counts})


def test_update_without_uploads_round_trips_to_none():
    back = update_from_records(update_to_records(Update(0, 1, {"w": torch.ones(1)}, 1.0)))
    assert back.bank_upload is None and back.retrieval_counts is None and back.extra == {}


def test_run_config_maps_to_flconfig_and_refuses_unknown_keys():
    cfg, app = config_from({"strategy": "scaffold", "samples-per-client": 24, "data-root": "", "out-dir": "/x"})
    assert (cfg.strategy, cfg.samples_per_client, cfg.data_root) == ("scaffold", 24, None)
    assert app == {"out_dir": "/x", "timeout": 600.0, "resume": False, "secagg": False, "secagg_clip": 8.0}
    with pytest.raises(ValueError, match="unknown keys"):
        config_from({"strategy": "fedavg", "roudns": 3})


@pytest.mark.parametrize("over, match", [({"strategy": "omnifm"}, "secagg: strategy"),
                                         ({"strategy": "scaffold"}, "secagg: strategy"),
                                         ({"participation": 0.5}, "at least 3 participants"),
                                         ({"secagg-clip": 0.0}, "secagg-clip")])
def test_secure_aggregation_refuses_what_it_cannot_cover(over, match):
    with pytest.raises(ValueError, match=match):
        config_from({"strategy": "fedavg", "clients": 4, "participation": 1.0, "secagg": True, **over})
    config_from({"strategy": "fedadam", "clients": 4, "participation": 1.0, "secagg": True})


def test_node_state_dir_keeps_two_rounds_and_serves_the_right_one(tmp_path):
    """A node's saved client state: written after each round it trains, the last two
    kept; a training message of round r reads the newest before r, an evaluation of round
    r (which follows r's training) the newest up to r; another experiment's files are
    never read."""
    from types import SimpleNamespace

    from flwr.app import MessageType, RecordDict

    def node(**run_config):
        return SimpleNamespace(node_config={"partition-id": 1, "state-dir": str(tmp_path)},
                               run_config={"strategy": "fedper", "rounds": 5, **run_config}, state=RecordDict())

    context = node()
    for r in (0, 2, 3):
        client = SimpleNamespace(local_state={"head": torch.full((2,), float(r))}, extra={})
        _keep(context, client, r)
    assert sorted(p.name[-11:] for p in tmp_path.iterdir()) == ["-r000002.pt", "-r000003.pt"]
    later = node(rounds=9)  # a resumed run: more rounds, same experiment
    assert _saved_state(later, 3, MessageType.TRAIN)["round"] == 2
    assert _saved_state(later, 3, MessageType.EVALUATE)["round"] == 3
    assert _saved_state(later, 4, MessageType.TRAIN)["local"]["head"].tolist() == [3.0, 3.0]
    assert _saved_state(later, 2, MessageType.TRAIN) is None  # round 0's file was dropped
    assert _saved_state(node(lr=0.5), 4, MessageType.TRAIN) is None


# -- real processes ------------------------------------------------------------
def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port, proc, tmp, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the SuperLink is not listening on {port}\n{logs(tmp)}")


def start(args, log, env):
    """In its own session, so stop() ends it with the ServerApp/ClientApp processes it spawns."""
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def make_certificates(where):
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl):
    (ca.crt, server.pem, server.key)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca_key, ca, key, csr, cert = (where / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.pem"))
    (where / "san.cnf").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for args in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=omnifm test CA",
                  "-keyout", ca_key, "-out", ca],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr],
                 ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
                  "-extfile", where / "san.cnf", "-out", cert]):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


@contextlib.contextmanager
def launch(tmp, tls=False, state_dirs=False):
    """A SuperLink and three SuperNodes on 127.0.0.1 (free ports), one thread each, no
    dependency installation; a Flower home whose connection `test` points at the
    SuperLink; with tls, every connection is TLS with certificates made here, else
    --insecure; with state_dirs, node K keeps its client state in tmp/nodeK. Yields
    (tmp, env, [superlink, *supernodes]); ends every process on exit."""
    link, *nodes = free_ports(4)
    home = tmp / "flwr_home"
    home.mkdir()
    if tls:
        ca, cert, key = make_certificates(tmp)
        link_security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        node_security = ["--root-certificates", str(ca)]
        cli_security = f'root-certificates = "{ca}"'
    else:
        link_security = node_security = ["--insecure"]
        cli_security = "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link}"\n{cli_security}\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_HOME": str(home),
           "PATH": BIN + os.pathsep + os.environ["PATH"]}  # the SuperLink/SuperNodes start flower-superexec by name
    procs = []
    try:
        procs.append(start([f"{BIN}/flower-superlink", *link_security, "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(link)], tmp / "superlink.log", env))
        wait_for_port(link, procs[0], tmp)
        for k, port in enumerate(nodes):
            procs.append(start([f"{BIN}/flower-supernode", *node_security, "--superlink", f"127.0.0.1:{link}",
                                "--host", "127.0.0.1", "--port", str(port),
                                "--node-config", f"partition-id={k} num-partitions=3"
                                + (f' state-dir="{tmp / f"node{k}"}"' if state_dirs else "")],
                               tmp / f"supernode{k}.log", env))
        # a copy: flwr may write next to the app, and the repo stays as it is
        shutil.copytree(os.path.join(ROOT, "flower_app"), tmp / "app", ignore=shutil.ignore_patterns("__pycache__"))
        yield tmp, env, procs
    finally:
        for p in reversed(procs):
            stop(p)
        kill_strays([link, *nodes])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with launch(tmp_path_factory.mktemp("flower")) as (tmp, env, _):
        yield tmp, env


@pytest.fixture(scope="module")
def tls_federation(tmp_path_factory):
    with launch(tmp_path_factory.mktemp("flower_tls"), tls=True) as (tmp, env, _):
        yield tmp, env


def kill_strays(ports):
    """A ServerApp/ClientApp of an unfinished run outlives its SuperLink/SuperNode (Flower
    starts them detached): end those of this test, found by its ports on their command line."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
            if "flwr" in cmd and any(f"127.0.0.1:{port}" in cmd for port in ports):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def logs(tmp):
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(tmp.glob("*.log")))


def submit(tmp, env, strategy, name=None, **over):
    """Start one run with flwr run (it returns once the SuperLink accepted it); its
    out_dir is tmp / (name or strategy)."""
    settings = {**TINY, "strategy": strategy, "out_dir": str(tmp / (name or strategy)), "timeout": WAIT, **over}
    def toml(v):
        return repr(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    overrides = " ".join(f"{k.replace('_', '-')}={toml(v)}" for k, v in settings.items())
    done = subprocess.run([f"{BIN}/flwr", "run", str(tmp / "app"), "test", "--run-config", overrides], env=env,
                          timeout=60, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"flwr run failed:\n{done.stdout}\n{done.stderr}\n{logs(tmp)}")


def result(tmp, strategy, rounds=1, wait=WAIT):
    """The server's server.pt of a run once `rounds` rounds are done (written atomically
    after each round)."""
    path, deadline = tmp / strategy / "server.pt", time.monotonic() + wait
    while time.monotonic() < deadline:
        if path.exists() and (state := read_checkpoint(path))["next_round"] >= rounds:
            return state
        time.sleep(0.5)
    pytest.fail(f"no server.pt after round {rounds} of the {strategy} run within {wait:g}s\n{logs(tmp)}")


def check_against_simulation(tmp, env, strategy):
    submit(tmp, env, strategy)  # one run at a time: side by side they starve each other on a busy machine
    flower = result(tmp, strategy)
    sim = Simulation(FLConfig(strategy=strategy, **TINY), progress=False)
    history = sim.run()
    assert flower["next_round"] == 1 and flower["history"][0]["aggregated"], logs(tmp)
    assert set(flower["global"]) == set(sim.global_state)
    for k, v in sim.global_state.items():
        torch.testing.assert_close(flower["global"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for name in sim.task.metrics:  # federated evaluation: the same weighted means
        assert flower["history"][0][name] == pytest.approx(history[0][name], rel=1e-5, nan_ok=True), name
    if sim.bank is not None:
        torch.testing.assert_close(flower["bank"]["entries"], sim.bank.entries, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # over a minute here (63-85 s): OMNIFM_SLOW=1 runs it
@pytest.mark.parametrize("strategy", ["fedavg", "omnifm"])
def test_one_round_on_flower_matches_the_simulation(federation, strategy):
    check_against_simulation(*federation, strategy)


def test_a_round_where_every_client_fails_is_not_aggregated_on_flower(federation):
    """Every ClientApp raises (its own client_timeout of 1 ms cuts training off after the
    first step): the replies are errors, the round has no usable update, and the server
    keeps its state (no aggregation from nothing)."""
    tmp, env = federation
    submit(tmp, env, "fedavg", name="all_fail", client_timeout=0.001)
    flower = result(tmp, "all_fail")
    row = flower["history"][0]
    assert not row["aggregated"] and row["rejected"] == [0, 1, 2], logs(tmp)
    initial = Simulation(FLConfig(strategy="fedavg", **TINY), progress=False).global_state
    for k, v in initial.items():
        assert torch.equal(flower["global"][k], v), k


@pytest.mark.slow  # over a minute here (63-85 s): OMNIFM_SLOW=1 runs it
def test_secure_aggregation_round_matches_the_simulation(federation):
    """FedAvg under SecAgg+: the server gets only the masked sum of the three nodes'
    changes, and its global state equals the in-process round's up to SecAgg+'s
    quantisation (2^22 levels over [-8, 8]: 4e-6 per node)."""
    tmp, env = federation
    submit(tmp, env, "fedavg", name="secagg", secagg=True)
    flower = result(tmp, "secagg")
    sim = Simulation(FLConfig(strategy="fedavg", **TINY), progress=False)
    history = sim.run()
    row = flower["history"][0]
    assert row["aggregated"] and row["secagg"] and row["rejected"] == [], logs(tmp)
    for k, v in sim.global_state.items():
        torch.testing.assert_close(flower["global"][k], v, rtol=0, atol=5e-5, msg=k)
    moved = max((sim.global_state[k] - v).abs().max().item() for k, v in
                Simulation(FLConfig(strategy="fedavg", **TINY), progress=False).global_state.items())
    assert moved > 1e-3  # the round changed the weights far beyond the tolerance
    assert row["loss"] == pytest.approx(history[0]["loss"], abs=1e-4)


@pytest.mark.slow  # over a minute here (63-85 s): OMNIFM_SLOW=1 runs it
def test_one_round_over_tls_matches_the_simulation(tls_federation):
    """The same round with every connection on TLS (the SuperNodes and flwr run verify
    the SuperLink against the test's CA); its port speaks TLS with that certificate
    and a client that does not trust the CA cannot complete the handshake."""
    tmp, env = tls_federation
    check_against_simulation(tmp, env, "omnifm")
    port = int(config_address(env).rsplit(":", 1)[1])
    trusting = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def config_address(env):
    text = open(os.path.join(env["FLWR_HOME"], "config.toml")).read()
    return text.split('address = "', 1)[1].split('"', 1)[0]
