"""In-process federated simulation: one process, clients run in turn, identical results
for a fixed seed. Writes one JSON line per round, and after every round an atomic
checkpoint from which `resume=True` continues to exactly the metrics of an
uninterrupted run."""
import contextlib
import dataclasses
import json
import math
import os
import time

import torch

from ..tasks import get_task
from .bank import KnowledgeBank
from .client import Client, load_state, recalibrate_bn, split_state, tensor_bytes
from .extras_store import ExtrasStore, OnDisk, read_extras, snapshot_path
from .partition import sample_participants
from .privacy import GaussianUploads
from .strategies import make_strategy


SYNTHETIC_SAMPLES = 160  # per client, when samples_per_client is not given


@dataclasses.dataclass
class FLConfig:
    task: str = "classification"  # a name in omnifm.tasks.TASKS
    strategy: str = "omnifm"
    data: str = "synthetic"  # the task says which sources it reads (with data_root)
    data_root: str | None = None
    scenario: str = "extra"  # the task's scenarios (classification: hard | medium | extra)
    clients: int = 10
    participation: float = 0.2
    rounds: int = 20
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0
    # synthetic data: samples per client (None: SYNTHETIC_SAMPLES); real data: a cap on each
    # client's samples (None: all of them)
    samples_per_client: int | None = None
    image_size: int = 32
    width: float = 0.25  # backbone width factor
    scale: int = 2  # super-resolution factor (tasks without one ignore it)
    tuning: str = "full"  # backbone parameters that train: full | lora | adapter | layernorm | bias (VQA)
    vqa_model: str = "tiny"  # the VQA encoders: tiny (built in code) or a local save_pretrained directory
    share_bn_stats: bool = False  # default FedBN-style: BN running statistics stay local
    lam: float = 0.1  # SPAlign weight (0 = the no-SPAlign ablation)
    topk: int = 2
    gskr: bool = True
    eca: bool = True
    psp: bool = True
    bank_capacity: int = 256
    bank_rho: float = 1.0
    bank_delta: float = 0.01
    eval_every: int = 1  # evaluate every N rounds (and the last); other rows carry no metrics
    eval_clients: int = 0  # evaluate a sample of N clients per evaluation (0: all of them)
    min_clients: int = 1  # a round with fewer usable updates is not aggregated (logged, state kept)
    client_timeout: float = 0.0  # > 0: seconds of local training a client may take in a round; past it, skipped
    extras_budget_mb: float = 0.0  # > 0: clients' strategy state (Ditto, MOON...) in memory up to this, the rest on disk
    dp_clip: float = 0.0  # > 0: clip each upload to this L2 norm and add noise (omnifm.fl.privacy)
    dp_noise: float = 0.0  # the Gaussian noise multiplier sigma (noise std = sigma * dp_clip)
    dp_delta: float = 1e-5  # the delta at which epsilon is reported

    @property
    def synthetic_samples(self):
        """Samples per client of the synthetic generators."""
        return self.samples_per_client or SYNTHETIC_SAMPLES

    def __post_init__(self):
        """Every setting checked when the config is made (before any data, model or
        file): a bad one raises ValueError/TypeError naming it."""
        from ..tasks import TASKS
        from .strategies import STRATEGIES

        for name, choices in (("task", TASKS), ("strategy", STRATEGIES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {', '.join(sorted(choices))}, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if f.name == "data_root":
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"data_root: expected a path, got {value!r}")
                continue
            if f.name == "samples_per_client":
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ValueError(f"samples_per_client: expected None or an int >= 1, got {value!r}")
                continue
            ok = (isinstance(value, kind) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                  isinstance(value, kind))
            if not ok:
                raise TypeError(f"{f.name}: expected {kind.__name__}, got {value!r}")
            if kind in (int, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}: expected a finite number, got {value!r}")
        at_least_1 = ("clients", "min_clients", "eval_every", "rounds", "local_epochs", "batch_size", "image_size", "topk",
                      "bank_capacity")
        for name in at_least_1:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        for name in ("lr", "width", "bank_rho"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        for name in ("lam", "bank_delta", "dp_clip", "dp_noise", "eval_clients", "client_timeout", "extras_budget_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation: expected a fraction in (0, 1], got {self.participation}")
        if self.min_clients > max(1, round(self.participation * self.clients)):
            raise ValueError(f"min_clients: {self.min_clients} is more than the {round(self.participation * self.clients)}"
                             f" clients a round draws ({self.participation:g} of {self.clients})")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta: expected a value in (0, 1), got {self.dp_delta}")
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise ValueError("dp_noise: noise needs a clipping norm (dp_clip > 0) to be calibrated to")


@dataclasses.dataclass
class RoundContext:
    round: int
    seed: int
    epochs: int
    batch_size: int
    lr: float
    loss_fn: object
    bank: torch.Tensor | None
    prototype_groups: object = None  # targets -> group ids for bank uploads (None: the targets)
    deadline: float | None = None  # time.monotonic() by which local training must end (None: no limit)


def validate_update(update, global_state, dim=None, bank_size=None):
    """None if the update is usable, else why it is rejected."""
    if set(update.weights) != set(global_state):
        return "its tensors do not match the shared state"
    for k, ref in global_state.items():
        w = update.weights[k]
        if w.shape != ref.shape or w.dtype != ref.dtype:
            return f"{k} has shape {tuple(w.shape)}/{w.dtype}, expected {tuple(ref.shape)}/{ref.dtype}"
        if w.is_floating_point() and not torch.isfinite(w).all():
            return f"{k} is not finite"
    if update.bank_upload is not None and (update.bank_upload.dim() != 2 or update.bank_upload.shape[1] != dim
                                           or not torch.isfinite(update.bank_upload).all()):
        return "its bank upload is malformed or not finite"
    if update.retrieval_counts is not None and (bank_size is None or update.retrieval_counts.shape != (bank_size,)
                                                or (update.retrieval_counts < 0).any()):
        return "its retrieval counts do not match the bank it was sent"
    if not (update.n_samples > 0):
        return "it reports no samples"
    return None


NORM_OUTLIER_RATIO = 100.0  # "huge": honest clients with 10x more data (more local steps) stay well under it


def norm_outliers(updates, global_state, ratio=NORM_OUTLIER_RATIO):
    """The updates whose change of the shared floating-point tensors has an L2 norm over
    ratio x the median of the round's (only with 3 or more updates, so the median is
    the honest majority's): a huge-norm upload would otherwise dominate the average."""
    if len(updates) < 3:
        return []
    names = [k for k, v in global_state.items() if v.is_floating_point()]
    norms = torch.stack([torch.sqrt(sum(((u.weights[k] - global_state[k]).double() ** 2).sum() for k in names))
                         for u in updates]) if names else torch.zeros(len(updates), dtype=torch.float64)
    limit = ratio * norms.median()
    return [u for u, n in zip(updates, norms.tolist()) if n > limit and n > 0]


def weighted_means(per_client):
    """[(values, weights)] of the clients -> {metric: mean weighted by its weights}; a
    client with weight 0 for a metric stays out of it; NaN where no client has any."""
    totals, weights = {}, {}
    for values, client_weights in per_client:
        for name, value in values.items():
            w = client_weights[name]
            totals.setdefault(name, 0.0)
            weights.setdefault(name, 0)
            if w > 0:
                totals[name] += value * w
                weights[name] += w
    return {name: totals[name] / weights[name] if weights[name] else math.nan for name in totals}


CHECKPOINT_KEYS = {"config", "next_round", "global", "strategy", "bank", "clients", "history"}


def read_checkpoint(path):
    """A checkpoint holds only tensors in dicts and lists of plain values, so it loads with
    weights_only=True: a damaged, foreign or malicious file is refused, never unpickled
    into arbitrary objects (which could run code)."""
    try:
        return torch.load(path, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # damage surfaces as UnpicklingError, RuntimeError, EOFError, ValueError, ...
        why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        raise ValueError(f"resume: {path} is not a readable checkpoint ({why})") from exc


# Settings a resumed run may change: how long it runs and how it holds the clients'
# state, never what it computes.
RESUMABLE_CHANGES = ("rounds", "extras_budget_mb")


class Simulation:
    def __init__(self, cfg, out_dir=None, *, progress=True, log=print):
        self.cfg, self.out_dir, self.progress, self.log = cfg, out_dir, progress, log
        torch.manual_seed(cfg.seed)
        self.task = get_task(cfg.task, cfg)
        parts = self.task.federation()
        if len(parts) != cfg.clients:
            raise ValueError(f"clients: the {cfg.task} data gave {len(parts)} clients, expected {cfg.clients}")
        for part in parts:
            if len(part.train) == 0 or len(part.test) == 0:
                raise ValueError(f"data: client {part.name!r} has an empty train or test split")
        omnifm = cfg.strategy == "omnifm"
        adapter = dict(topk=cfg.topk, gskr=cfg.gskr, eca=cfg.eca, psp=cfg.psp)
        self.model = self.task.build_model(omnifm=omnifm, adapter_kwargs=adapter)
        hp = {"lam": cfg.lam} if omnifm else {}  # SPAlign weight; other strategies keep their defaults
        # state-dict names (a module registered twice has two): frozen parameters are not shared
        frozen = [name for name, t in self.model.state_dict(keep_vars=True).items()
                  if isinstance(t, torch.nn.Parameter) and not t.requires_grad]
        self.strategy = make_strategy(cfg.strategy, head_prefix=self.task.head_prefix,
                                      share_bn_stats=cfg.share_bn_stats, frozen=frozen, **hp)
        self.global_state, local = split_state(self.model, self.strategy.is_shared)
        self.clients = [Client(k, p.train, p.test, {n: t.clone() for n, t in local.items()}, name=p.name)
                        for k, p in enumerate(parts)]
        self.extras = None if not cfg.extras_budget_mb else ExtrasStore(
            self.clients, int(cfg.extras_budget_mb * 2**20), os.path.join(out_dir, "spill") if out_dir else None)
        self.dim = self.task.adapter_dim
        self.bank = KnowledgeBank(self.dim, capacity=cfg.bank_capacity, rho=cfg.bank_rho, delta=cfg.bank_delta) \
            if self.strategy.uses_bank else None
        self.privacy = GaussianUploads(cfg.dp_clip, cfg.dp_noise, cfg.dp_delta) if cfg.dp_clip > 0 else None
        self.history, self.next_round = [], 0

    # -- state ----------------------------------------------------------------
    def state_dict(self, extras_files=None):
        """extras_files {cid: file}: the clients' extras are in those files (a snapshot
        of the ExtrasStore), named instead of gathered into memory."""
        clients = [{"local": c.local_state, "extra": c.extra} if extras_files is None else
                   {"local": c.local_state, "extra": {}, "extra_file": extras_files[c.cid]} for c in self.clients]
        return {"config": dataclasses.asdict(self.cfg), "next_round": self.next_round, "global": self.global_state,
                "strategy": self.strategy.state_dict(), "bank": self.bank.state_dict() if self.bank else None,
                "clients": clients, "history": self.history}

    def load_state_dict(self, state, source="the checkpoint"):
        """Refuses a state from another program or another run before changing anything."""
        if not isinstance(state, dict) or set(state) != CHECKPOINT_KEYS:
            raise ValueError(f"resume: {source} is not an omnifm checkpoint (keys: {sorted(CHECKPOINT_KEYS)})")
        # a setting newer than the checkpoint counts as its default (what that run used)
        saved = {**dataclasses.asdict(FLConfig()), **state["config"]}
        mine = dataclasses.asdict(self.cfg)
        diff = {k for k in mine if k not in RESUMABLE_CHANGES and saved[k] != mine[k]}
        if diff:
            raise ValueError(f"resume: {source} was made with different settings: {sorted(diff)}")
        shapes = {k: v.shape for k, v in self.global_state.items()}
        if len(state["clients"]) != len(self.clients) or {k: v.shape for k, v in state["global"].items()} != shapes:
            raise ValueError(f"resume: {source} does not match this model and federation")
        self.next_round, self.global_state, self.history = state["next_round"], state["global"], state["history"]
        self.strategy.load_state_dict(state["strategy"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        for c, s in zip(self.clients, state["clients"]):
            c.local_state, c.extra = s["local"], s["extra"]
            if "extra_file" in s:  # written with an extras budget: the file is in the checkpoint's directory
                where = os.path.dirname(os.path.abspath(source))
                if self.extras is not None:
                    self.extras.restore(c, where, s["extra_file"])
                else:
                    c.extra = read_extras(snapshot_path(where, s["extra_file"], c.cid), c.cid)
        if self.extras is not None:  # extras the checkpoint held inline: fit them to this run's budget
            for c in self.clients:
                if not isinstance(c.extra, OnDisk):
                    self.extras.release(c)

    def holding_extras(self, client):
        """Context: client's strategy state in memory, then back under the budget."""
        return self.extras.holding(client) if self.extras is not None else contextlib.nullcontext()

    def checkpoint(self):
        """Atomic: write a temporary file, then rename over the old checkpoint."""
        path = os.path.join(self.out_dir, "checkpoint.pt")
        tmp = path + ".tmp"
        # With a budget, the clients' extras go to a snapshot beside it, never all into memory at once.
        files = self.extras.snapshot(self.out_dir, self.next_round) if self.extras is not None else None
        torch.save(self.state_dict(files), tmp)
        os.replace(tmp, path)
        if self.extras is not None:
            self.extras.drop_old_snapshots(self.out_dir, self.next_round)

    def resume(self):
        path = os.path.join(self.out_dir, "checkpoint.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        self.load_state_dict(read_checkpoint(path), source=path)

    # -- rounds ---------------------------------------------------------------
    def context(self, round_idx, cid):
        bank = self.bank.entries if self.bank is not None else None
        deadline = time.monotonic() + self.cfg.client_timeout if self.cfg.client_timeout > 0 else None
        return RoundContext(round_idx, self.cfg.seed * 100_003 + round_idx * 1009 + cid, self.cfg.local_epochs,
                            self.cfg.batch_size, self.cfg.lr, self.task.loss, bank, self.task.prototype_groups,
                            deadline)

    def seed_bank(self):
        """Round 0 seeding: every client uploads prototypes from the initial tokenizer."""
        self.bank.seed({c.cid: self.seed_upload(c) for c in self.clients})

    def seed_upload(self, client):
        """What a client sends to seed the bank: the prototypes of the initial model
        (noised on the client, like every later upload, under DP)."""
        from .strategies import prototypes

        load_state(self.model, self.global_state, client.local_state)
        upload = prototypes(self.model, client, self.task.prototype_groups)
        if self.privacy is not None:
            gen = torch.Generator().manual_seed(self.context(-1, client.cid).seed + 7)
            upload = self.privacy.privatize_prototypes(upload, gen)
        return upload

    def client_updates(self, r, participants):
        """{cid: the Update it sends, or the exception its training raised}: here each
        participant trains in turn on the one model (a deployment sends them to nodes)."""
        out = {}
        for cid in participants:
            try:
                with self.holding_extras(self.clients[cid]):
                    update = self.strategy.client_train(self.clients[cid], self.model, self.global_state,
                                                        self.context(r, cid))
                if self.privacy is not None:  # on the client, before anything leaves it
                    update = self.privacy.privatize(update, self.global_state, self.context(r, cid).seed + 7)
                out[cid] = update
            except Exception as exc:
                out[cid] = exc
        return out

    def run_round(self, r):
        t0 = time.perf_counter()
        participants = sample_participants(self.cfg.clients, self.cfg.participation, r, seed=self.cfg.seed)
        down = tensor_bytes(self.global_state) + (tensor_bytes(self.bank.entries) if self.bank else 0)
        updates, rejected, up = [], [], 0
        for cid, update in self.client_updates(r, participants).items():
            if isinstance(update, Exception):  # a failing client must not stop the federation
                rejected.append(cid)
                self.log(f"round {r}: client {cid} failed ({type(update).__name__}: {update}); skipped")
                continue
            why = validate_update(update, self.global_state, self.dim, len(self.bank) if self.bank else None)
            if why is None and (update.client != cid or any(u.client == cid for u in updates)):
                why = f"it claims to be client {update.client}" if update.client != cid else "a second update"
            if why is not None:
                rejected.append(cid)
                self.log(f"round {r}: update of client {cid} rejected: {why}")
                continue
            up += update.contributors * (tensor_bytes(update.weights) + tensor_bytes(update.extra)
                                         + tensor_bytes(update.bank_upload))
            updates.append(update)
        for u in norm_outliers(updates, self.global_state):
            rejected.append(u.client)
            self.log(f"round {r}: update of client {u.client} rejected: its change is over {NORM_OUTLIER_RATIO:g}x "
                     "the round's median")
            updates.remove(u)
        usable = sum(u.contributors for u in updates)
        aggregated = usable >= self.cfg.min_clients and usable > 0
        if not aggregated:  # too few replies: the server's state stays as it was
            self.log(f"round {r}: {usable} usable updates, fewer than min_clients={self.cfg.min_clients}; "
                     "not aggregated")
        else:
            self.global_state = self.strategy.aggregate(self.global_state, updates, self.cfg.clients)
            if self.bank is not None:
                counts = {u.client: u.retrieval_counts for u in updates if u.retrieval_counts is not None}
                if counts:  # (with DP none are sent: the bank keeps its usage as it was)
                    self.bank.record(counts)
                    self.bank.prune()
                self.bank.insert({u.client: u.bank_upload for u in updates})
                self.bank.end_round()
        evaluated = (r + 1) % self.cfg.eval_every == 0 or r + 1 == self.cfg.rounds
        row = {"round": r + 1, **(self.evaluate(self.eval_sample(r)) if evaluated else {}),
               "loss": sum(u.loss for u in updates) / len(updates) if updates else float("nan"),
               "seconds": time.perf_counter() - t0, "bytes_up": up, "bytes_down": down * len(participants),
               "clients": participants, "rejected": rejected, "aggregated": aggregated}
        if self.bank is not None:
            row["bank_size"] = len(self.bank)
        if self.privacy is not None:  # the worst client's privacy loss so far, this round included
            taken = [cid for h in [*self.history, row] for cid in h["clients"]]
            row["epsilon"] = max(self.privacy.epsilon(taken.count(c), seeded=self.bank is not None)
                                 for c in range(len(self.clients)))
            row["dp_delta"] = self.cfg.dp_delta
        return row

    def eval_sample(self, r):
        """The clients evaluated after round r: all, or eval_clients of them drawn with
        (seed, round) like the participants (a fresh sample each time)."""
        if not self.cfg.eval_clients or self.cfg.eval_clients >= len(self.clients):
            return self.clients
        ids = sample_participants(len(self.clients), self.cfg.eval_clients / len(self.clients), r,
                                  seed=self.cfg.seed + 1)
        return [self.clients[i] for i in ids]

    def evaluate(self, clients=None):
        """Personalised: each client's model on its own held-out split (all clients, or
        those given); every metric is the mean over clients weighted by the task's
        `metric_weights` (held-out samples, or the samples a metric is about); NaN where
        no client has any."""
        per_client = []
        for c in self.clients if clients is None else clients:
            with self.holding_extras(c):
                load_state(self.model, *self.strategy.eval_state(c, self.global_state))
            if self.bank is not None:
                self.model.set_bank(self.bank.entries)
            recalibrate_bn(self.model, c.train)
            values, client_weights = self.task.evaluate(self.model, c.test), self.task.metric_weights(c.test)
            per_client.append((values, {name: client_weights.get(name, len(c.test)) for name in values}))
        return weighted_means(per_client)

    def run(self, resume=False):
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            self.resume()
        elif self.bank is not None:
            self.seed_bank()
        rounds = range(self.next_round, self.cfg.rounds)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.rounds, initial=self.next_round, desc=self.cfg.strategy, unit="round")
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl") if self.out_dir else None
        if metrics_path:  # the checkpoint's history is authoritative (a resume rewrites the file)
            with open(metrics_path, "w") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in self.history)
        for r in rounds:
            row = self.run_round(r)
            self.history.append(row)
            self.next_round = r + 1
            if metrics_path:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                self.checkpoint()
            if bar is not None:
                bar.set_postfix({k: f"{row[k]:.3f}" for k in self.task.metrics if k in row})
                bar.update(1)
        if bar is not None:
            bar.close()
        return self.history
