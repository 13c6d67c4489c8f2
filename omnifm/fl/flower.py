"""omnifm on Flower (Message API): the same strategies, knowledge bank and clients as the
in-process Simulation, with each hospital on its own SuperNode.

Both sides build a `Simulation` from the run config (FLConfig fields), so every process
starts from the same seeded model, strategy and federation; a node then acts only as
client `partition-id`. The server is a Simulation whose clients' training and
evaluation happen on their nodes: its rounds (participants, validation, outlier
rejection, aggregation, bank lifecycle, metrics.jsonl) are Simulation's own.

On the wire everything is a Flower record, never a pickle: tensors in ArrayRecords
(weights, bank entries, uploads, strategy extras), settings in ConfigRecords, numbers in
MetricRecords. A node keeps its client's private/local tensors and strategy extras
between rounds in `context.state`, as ArrayRecords, and, given a `state-dir` in its
node config, also on its own disk after every round it trains (so a new run that
resumes the server's checkpoint, or a restarted SuperNode, finds them again).

Needs `pip install omnifm[flower]` (flwr >= 1.20); `omnifm.fl` itself does not import it.
"""
import dataclasses
import glob
import hashlib
import json
import os
import time

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .client import Update
from .flower_secagg import check_secagg, is_secure_round, secagg_if_requested, secure_client_updates, secure_train
from .simulation import CHECKPOINT_KEYS, FLConfig, Simulation, read_checkpoint, weighted_means

# run-config keys of the app itself (not FLConfig fields); resume: continue from out_dir/server.pt
APP_KEYS = {"out_dir": "", "timeout": 600.0, "resume": False, "secagg": False, "secagg_clip": 8.0}
CLIENT_SIDE_STATE = {"scaffold": ("c",)}  # the server state a strategy's client_train reads (SCAFFOLD's c)
UPLOADS = ("bank_upload", "retrieval_counts")


# -- records ------------------------------------------------------------------
def to_record(tensors):
    """{name: tensor} -> ArrayRecord (numpy .npy bytes, dtype and shape kept exactly)."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()})


def to_tensors(record):
    """ArrayRecord -> {name: tensor}; torch.tensor copies (the decoded arrays are read-only)."""
    return {k: torch.tensor(a.numpy()) for k, a in record.items()}


def pack(prefix, nested):
    """{name: {key: tensor}} -> {prefix + name: ArrayRecord} (strategy extras and state)."""
    return {prefix + name: to_record(tensors) for name, tensors in nested.items()}


def unpack(records, prefix):
    return {k[len(prefix):]: to_tensors(r) for k, r in records.array_records.items() if k.startswith(prefix)}


def update_to_records(update):
    uploads = {k: getattr(update, k) for k in UPLOADS if getattr(update, k) is not None}
    return RecordDict({"weights": to_record(update.weights), "uploads": to_record(uploads),
                       "metrics": MetricRecord({"client": update.client, "n_samples": update.n_samples,
                                                "loss": float(update.loss)}),
                       **pack("extra.", update.extra)})


def update_from_records(records):
    metrics, uploads = records["metrics"], to_tensors(records["uploads"])
    return Update(int(metrics["client"]), int(metrics["n_samples"]), to_tensors(records["weights"]),
                  float(metrics["loss"]), unpack(records, "extra."), *(uploads.get(k) for k in UPLOADS))


def config_from(run_config):
    """(FLConfig, app settings) from a Flower run config; keys may use - or _, and
    data-root "" stands for None (TOML has no null). An unknown key is an error (a typo
    would otherwise silently run the defaults)."""
    fields = {f.name for f in dataclasses.fields(FLConfig)}
    given = {k.replace("-", "_"): v for k, v in run_config.items()}
    if given.get("data_root") == "":
        del given["data_root"]
    unknown = set(given) - fields - set(APP_KEYS)
    if unknown:
        raise ValueError(f"run config: unknown keys {sorted(unknown)}")
    app = {k: given.get(k, default) for k, default in APP_KEYS.items()}
    cfg = FLConfig(**{k: v for k, v in given.items() if k in fields})
    if app["secagg"]:
        check_secagg(cfg, float(app["secagg_clip"]))
    return cfg, app


def _broadcast(sim, r):
    """What a node needs to train or evaluate in round r: the shared state, the bank's
    entries (never its owners or usage) and the server state its client_train reads."""
    content = RecordDict({"global": to_record(sim.global_state), "config": ConfigRecord({"round": r})})
    if sim.bank is not None:
        content["bank"] = to_record({"entries": sim.bank.entries})
    state = sim.strategy.state_dict()
    content.update(pack("strategy.", {k: state[k] for k in CLIENT_SIDE_STATE.get(sim.cfg.strategy, ())}))
    return content


# -- server -------------------------------------------------------------------
class FlowerServer(Simulation):
    """A Simulation whose clients train and evaluate on their SuperNodes."""

    def __init__(self, cfg, grid, out_dir=None, *, timeout=600.0, log=print, secagg_clip=None, flwr_context=None):
        super().__init__(cfg, out_dir or None, progress=False, log=log)
        self.grid, self.timeout = grid, timeout
        self.secagg_clip, self.flwr_context = secagg_clip, flwr_context  # secagg_clip None: no secure aggregation
        self.nodes, self.first_uploads = self.find_nodes()

    def send(self, kind, cids, content, group=""):
        """{cid: reply RecordDict, or the exception that stands for a lost or failed reply}."""
        messages = [Message(content, self.nodes[c], kind, group_id=group) for c in cids]
        client_of = {node: c for c, node in self.nodes.items()}
        got = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            cid = client_of[reply.metadata.src_node_id]
            got[cid] = RuntimeError(f"node error: {reply.error.reason}") if reply.has_error() else reply.content
        return {c: got.get(c, TimeoutError(f"no reply within {self.timeout:g}s")) for c in cids}

    def find_nodes(self):
        """Wait for the nodes, ask each its partition (and, with a bank, its round-0
        prototypes: one message instead of two); every partition exactly once."""
        deadline = time.monotonic() + self.timeout
        while len(ids := sorted(self.grid.get_node_ids())) < self.cfg.clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids)} SuperNodes connected in {self.timeout:g}s, expected {self.cfg.clients}")
            time.sleep(1.0)
        self.nodes = dict(enumerate(ids))  # provisional keys, until the nodes say which partition they hold
        nodes, uploads = {}, {}
        for key, reply in self.send(MessageType.QUERY, list(self.nodes), RecordDict()).items():
            if isinstance(reply, Exception):
                raise reply
            pid = int(reply["config"]["partition-id"])
            if pid in nodes:
                raise ValueError(f"two SuperNodes hold partition {pid}")
            nodes[pid] = self.nodes[key]
            uploads[pid] = to_tensors(reply["uploads"]).get("bank_upload")
        if set(nodes) != set(range(self.cfg.clients)):
            raise ValueError(f"SuperNodes hold partitions {sorted(nodes)}, expected 0..{self.cfg.clients - 1}")
        return nodes, uploads

    def seed_bank(self):
        self.bank.seed(self.first_uploads)

    def resume(self):
        """Continue from out_dir/server.pt (the clients' own state is on their nodes)."""
        path = os.path.join(self.out_dir, "server.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        state = read_checkpoint(path)
        if isinstance(state, dict) and set(state) == CHECKPOINT_KEYS - {"clients"}:
            state["clients"] = [{"local": c.local_state, "extra": c.extra} for c in self.clients]
        self.load_state_dict(state, source=path)

    def client_updates(self, r, participants):
        """The participants train on their nodes (and clip and noise there, under DP);
        with secure aggregation, one Update that stands for all of them."""
        if self.secagg_clip is not None:
            return secure_client_updates(self, r, participants, self.secagg_clip, self.flwr_context)
        replies = self.send(MessageType.TRAIN, participants, _broadcast(self, r), str(r))
        return {cid: reply if isinstance(reply, Exception) else update_from_records(reply)
                for cid, reply in replies.items()}

    def run_round(self, r):
        row = super().run_round(r)
        if self.secagg_clip is not None:  # its one update came out of a completed SecAgg+ round, or none did
            row["secagg"] = True
        return row

    def evaluate(self, clients=None):
        """Simulation.evaluate's weighted means, over the values and weights the nodes report."""
        cids = [c.cid for c in (self.clients if clients is None else clients)]
        per_client = []
        for cid, reply in self.send(MessageType.EVALUATE, cids, _broadcast(self, self.next_round)).items():
            if isinstance(reply, Exception):
                self.log(f"evaluation: client {cid} failed ({reply}); left out")
                continue
            metrics = reply["metrics"]
            names = [k for k in metrics if not k.endswith(".weight")]
            per_client.append(({k: metrics[k] for k in names}, {k: metrics[f"{k}.weight"] for k in names}))
        return weighted_means(per_client)

    def checkpoint(self):
        """The server's part of Simulation's checkpoint (the clients' states live on their
        nodes), atomically to server.pt; read it with read_checkpoint."""
        state = self.state_dict()
        del state["clients"]
        path = os.path.join(self.out_dir, "server.pt")
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)


def make_server_app():
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)  # tiny tensors; leaves the cores to the clients
        cfg, settings = config_from(context.run_config)
        clip = float(settings["secagg_clip"]) if settings["secagg"] else None
        FlowerServer(cfg, grid, settings["out_dir"], timeout=float(settings["timeout"]), secagg_clip=clip,
                     flwr_context=context).run(resume=bool(settings["resume"]))

    return app


# -- client -------------------------------------------------------------------
def _node(message, context, round_idx=None):
    """This node's Simulation and Client, with the state it kept from earlier rounds and
    what the server broadcast. A ClientApp process lives for one message, so it is rebuilt
    each time: cheap for the synthetic tasks, and identical on every call. round_idx: the
    round of a message that does not carry our config record (a secure round's FitIns)."""
    cfg, _ = config_from(context.run_config)
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    if n != cfg.clients or not 0 <= pid < n:
        raise ValueError(f"node config: partition {pid} of {n}, but the run has clients={cfg.clients}")
    sim = Simulation(cfg, progress=False)
    client = sim.clients[pid]
    content = message.content
    if round_idx is None and "config" in content:
        round_idx = int(content["config"]["round"])
    if "local" not in context.state and round_idx is not None:  # a new run or a restarted node
        saved = _saved_state(context, round_idx, message.metadata.message_type)
        if saved is not None:
            context.state["local"] = to_record(saved["local"])
            context.state.update(pack("extra.", saved["extra"]))
    if "local" in context.state:
        client.local_state = to_tensors(context.state["local"])
    client.extra = unpack(context.state, "extra.")
    if "global" in content:
        sim.global_state = to_tensors(content["global"])
    if "bank" in content:
        sim.bank.entries = to_tensors(content["bank"])["entries"]
    strategy_state = unpack(content, "strategy.")
    if strategy_state:
        sim.strategy.load_state_dict(strategy_state)
    return sim, client


def _train(message, context, round_idx=None, global_arrays=None):
    """(sim, client, update) of this node's training in a round: DP applied before
    anything leaves the node (same seed as Simulation.run_round), the client's private
    state kept. round_idx and global_arrays (the shared weights in sim.global_state's
    order): a secure round's, which its FitIns carries instead of our records."""
    sim, client = _node(message, context, round_idx)
    if global_arrays is not None:
        sim.global_state = {k: torch.tensor(a) for k, a in zip(sim.global_state, global_arrays)}
    r = int(message.content["config"]["round"]) if round_idx is None else round_idx
    ctx = sim.context(r, client.cid)
    update = sim.strategy.client_train(client, sim.model, sim.global_state, ctx)
    if sim.privacy is not None:
        update = sim.privacy.privatize(update, sim.global_state, ctx.seed + 7)
    _keep(context, client, r)
    return sim, client, update


def _keep(context, client, round_idx):
    for key in [k for k in context.state.array_records if k.startswith("extra.")]:
        del context.state[key]
    context.state["local"] = to_record(client.local_state)
    context.state.update(pack("extra.", client.extra))
    prefix = _state_prefix(context)
    if prefix is not None:  # atomically, then drop all but the last two rounds' files
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        path = f"{prefix}-r{round_idx:06d}.pt"
        torch.save({"round": round_idx, "local": client.local_state, "extra": client.extra}, path + ".tmp")
        os.replace(path + ".tmp", path)
        for old in sorted(glob.glob(f"{prefix}-r*.pt"))[:-2]:
            os.remove(old)


def _state_prefix(context):
    """<state-dir>/<experiment>-p<partition>, the experiment being a digest of the run
    config (every setting but the number of rounds, the output directory included); None
    without a state-dir in the node config."""
    state_dir = context.node_config.get("state-dir")
    if not state_dir:
        return None
    settings = {k: v for k, v in sorted(context.run_config.items()) if k.replace("-", "_") not in ("rounds", "resume")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(state_dir, f"omnifm-{digest}-p{int(context.node_config['partition-id'])}")


def _saved_state(context, round_idx, kind):
    """The client state this node saved last before round round_idx (for a training
    message; up to and including it for an evaluation, which follows the round's
    training), read as tensors only; None if there is none."""
    prefix = _state_prefix(context)
    if prefix is None:
        return None
    end = round_idx + 1 if str(kind).startswith(MessageType.EVALUATE) else round_idx
    usable = [p for p in glob.glob(f"{prefix}-r*.pt") if int(p[-len("000000.pt"):-len(".pt")]) < end]
    if not usable:
        return None
    newest = max(usable)  # zero-padded rounds: the name order is the round order
    state = read_checkpoint(newest)
    if not isinstance(state, dict) or set(state) != {"round", "local", "extra"}:
        raise ValueError(f"state-dir: {newest} is not a client state this app wrote")
    return state


def make_client_app():
    app = ClientApp(mods=[secagg_if_requested])

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """Which partition this node holds and, with a bank, its round-0 prototypes
        (Simulation.seed_bank's upload, from the initial model)."""
        sim, client = _node(message, context)
        uploads = {"bank_upload": sim.seed_upload(client)} if sim.bank is not None else {}
        config = ConfigRecord({"partition-id": client.cid})
        return Message(RecordDict({"config": config, "uploads": to_record(uploads)}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if is_secure_round(message):
            clip = float(config_from(context.run_config)[1]["secagg_clip"])
            return secure_train(message, lambda r, arrays: _train(message, context, r, arrays), clip)
        _, _, update = _train(message, context)
        return Message(update_to_records(update), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """This client's metrics (Simulation.evaluate of one client) and their weights."""
        sim, client = _node(message, context)
        values, weights = sim.evaluate([client]), sim.task.metric_weights(client.test)
        metrics = {**values, **{f"{k}.weight": weights.get(k, len(client.test)) for k in values}}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

    return app
