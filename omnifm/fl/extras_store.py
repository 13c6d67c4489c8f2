"""Clients' strategy state past a memory budget, kept on disk.

Ditto keeps a personal model per client, MOON the client's previous model, SCAFFOLD and
FedDyn a weight-sized tensor set: with a thousand clients that is a thousand models. With
a budget (FLConfig.extras_budget_mb), the least recently used clients' extras beyond it
are written to disk and read back when that client trains or is evaluated again.

A spilled client's `extra` is an `OnDisk` marker that refuses every access, so code that
forgot to bring it back fails loudly instead of reading an empty state. Files hold
tensors only, are written atomically and read with weights_only (never unpickled).

Checkpoints do not gather the spilled extras into memory: `snapshot()` hard-links (or
copies) each client's file into `<out_dir>/extras/r<round>/` and the checkpoint names it;
resuming reads them back lazily.
"""
import contextlib
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .client import tensor_bytes


class OnDisk(Mapping):
    """Stands for a client's extras while they are on disk."""

    def __init__(self, path):
        self.path = path

    def _refuse(self, *args):
        raise RuntimeError(f"client extras are on disk ({self.path}): ExtrasStore.use(client) first")

    __getitem__ = __iter__ = __len__ = _refuse


def read_extras(path, cid):
    """A client's extras from one of our files; ValueError naming the file otherwise."""
    try:
        state = torch.load(path, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # damage: UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"extras: {path} is not a readable client state ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or set(state) != {"client", "extra"} or state["client"] != cid:
        raise ValueError(f"extras: {path} is not client {cid}'s state")
    return state["extra"]


def _write(path, cid, extra):
    torch.save({"client": cid, "extra": extra}, path + ".tmp")
    os.replace(path + ".tmp", path)


class ExtrasStore:
    """Keeps at most budget_bytes of the clients' extras in memory (0: spill every one
    as soon as it is released); the rest in `directory` (a temporary one if None)."""

    def __init__(self, clients, budget_bytes, directory=None):
        self.clients = {c.cid: c for c in clients}
        self.budget = budget_bytes
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="omnifm-extras-")
        self.dir = directory or self._tmp.name
        os.makedirs(self.dir, exist_ok=True)
        self.in_memory = OrderedDict()  # cid -> bytes, least recently used first

    def use(self, client):
        """Bring client's extras into memory (read back from disk if spilled)."""
        if isinstance(client.extra, OnDisk):
            client.extra = read_extras(client.extra.path, client.cid)
        self.in_memory[client.cid] = tensor_bytes(client.extra)
        self.in_memory.move_to_end(client.cid)

    def release(self, client):
        """client is done for now: account its extras, then spill the least recently used
        clients' until the rest fits the budget."""
        self.use(client)
        while self.in_memory and sum(self.in_memory.values()) > self.budget:
            cid, _ = self.in_memory.popitem(last=False)
            victim = self.clients[cid]
            if victim.extra:  # an empty state stays (nothing to save)
                path = os.path.join(self.dir, f"client{cid:06d}.pt")
                _write(path, cid, victim.extra)
                victim.extra = OnDisk(path)

    @contextlib.contextmanager
    def holding(self, client):
        """use(client) for the block, release(client) after it (also when it raises)."""
        self.use(client)
        try:
            yield
        finally:
            self.release(client)

    def bytes_in_memory(self):
        return sum(tensor_bytes(c.extra) for c in self.clients.values() if not isinstance(c.extra, OnDisk))

    def snapshot(self, out_dir, round_idx):
        """{cid: file name relative to out_dir} of every client's extras at this point,
        under out_dir/extras/r<round>/ (spilled ones hard-linked, others written), and the
        older snapshots removed once the caller has saved the checkpoint naming this one
        (call drop_old_snapshots after)."""
        rel = os.path.join("extras", f"r{round_idx:06d}")
        where = os.path.join(out_dir, rel)
        shutil.rmtree(where, ignore_errors=True)  # a half-written one from a crash
        os.makedirs(where)
        names = {}
        for cid, c in self.clients.items():
            name = os.path.join(rel, f"client{cid:06d}.pt")
            if isinstance(c.extra, OnDisk):
                try:
                    os.link(c.extra.path, os.path.join(out_dir, name))
                except OSError:  # another file system: copy
                    shutil.copyfile(c.extra.path, os.path.join(out_dir, name))
            else:
                _write(os.path.join(out_dir, name), cid, c.extra)
            names[cid] = name
        return names

    @staticmethod
    def drop_old_snapshots(out_dir, keep_round):
        root = os.path.join(out_dir, "extras")
        for name in os.listdir(root) if os.path.isdir(root) else ():
            if name != f"r{keep_round:06d}":
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def restore(self, client, out_dir, name):
        """Point client at its file in a checkpoint's snapshot, through a link in the
        spill directory (a later snapshot may drop this one; read when next used)."""
        source = snapshot_path(out_dir, name, client.cid)
        path = os.path.join(self.dir, f"client{client.cid:06d}.pt")
        if os.path.exists(path):
            os.remove(path)
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)
        client.extra = OnDisk(path)
        self.in_memory.pop(client.cid, None)


def snapshot_path(out_dir, name, cid):
    """The file a checkpoint names for client cid's extras, which must lie in
    out_dir/extras (a checkpoint cannot point anywhere else on the disk)."""
    path = os.path.normpath(os.path.join(out_dir, name))
    if not path.startswith(os.path.join(os.path.normpath(out_dir), "extras") + os.sep):
        raise ValueError(f"resume: client {cid}'s extras file {name!r} is outside {out_dir}/extras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: client {cid}'s extras file {path} is missing")
    return path
