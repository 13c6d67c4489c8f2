"""KnowledgeBank at scale: every operation on a bank of --entries prototypes of --dim
from --owners clients, and the process's peak memory against the entries' own size.

    python bench/bench_bank.py                                   # 1e6 entries, d=256, 1,000 owners
    python bench/bench_bank.py --entries 100000 --owners 100

One round at 10 % participation: record (the participants' retrieval counts), prune,
insert (each participant replaces its prototypes), evict (after the capacity is cut by
--evict entries), and the per-owner guard alone. Each operation is checked (sizes,
owners, the guard's one entry per owner) before its time is reported; the peak
resident memory is read from the kernel (ru_maxrss) after each step.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_args, append_csv, csv_path  # noqa: E402

from omnifm.fl import KnowledgeBank  # noqa: E402


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--owners", type=int, default=1000)
    p.add_argument("--participation", type=float, default=0.1)
    p.add_argument("--evict", type=int, default=100_000, help="entries over capacity for the evict step")
    p.add_argument("--threads", type=int, default=None)
    add_output_args(p)
    args = p.parse_args(argv)
    for name in ("entries", "dim", "owners"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected at least 1")
    if args.entries % args.owners:
        p.error("--entries must be a multiple of --owners (each owner holds entries / owners prototypes)")
    if args.threads:
        torch.set_num_threads(args.threads)
    per_owner, gen = args.entries // args.owners, torch.Generator().manual_seed(0)
    entry_mb = args.entries * args.dim * 4 / 2**20

    def uploads(owners):
        return {o: torch.nn.functional.normalize(torch.randn(per_owner, args.dim, generator=gen), dim=1)
                for o in owners}

    rows, base_mb = [], peak_mb()
    torch.zeros(1).add_(1)  # the first torch op's one-off costs are not the bank's
    bank = KnowledgeBank(args.dim, capacity=args.entries, rho=1.0, grace=0)
    all_owners = list(range(args.owners))
    seed_uploads = uploads(all_owners)
    upload_mb = (peak_mb() - base_mb)  # the uploads exist before the bank copies them in
    _, ms = timed(lambda: bank.seed(seed_uploads))
    del seed_uploads
    assert len(bank) == args.entries and bank.owners.unique().numel() == args.owners
    rows.append(("seed", ms, f"{args.owners} owners x {per_owner}"))
    bank.end_round()

    participants = all_owners[:: max(1, round(1 / args.participation))]
    counts = {o: torch.randint(0, 3, (len(bank),), generator=gen) for o in participants}
    _, ms = timed(lambda: bank.record(counts))
    del counts
    assert torch.isfinite(bank.freq).all() and bank.freq.sum() > 0
    rows.append(("record", ms, f"{len(participants)} clients' counts"))

    guard, ms = timed(bank._guarded)
    assert int(guard.sum()) == args.owners  # one per owner
    rows.append(("guard", ms, "each owner's most retrieved entry"))

    before = len(bank)
    bank.delta = float(bank.freq.quantile(0.1))  # a threshold that prunes about a tenth
    _, ms = timed(bank.prune)
    assert len(bank) <= before and bank.owners.unique().numel() == args.owners  # the guard kept every owner
    rows.append(("prune", ms, f"{before - len(bank)} pruned"))

    fresh = uploads(participants)
    _, ms = timed(lambda: bank.insert(fresh))
    del fresh
    assert all((bank.owners == o).sum() == per_owner for o in participants[:5])
    rows.append(("insert", ms, f"{len(participants)} clients replace {per_owner} each"))

    bank.capacity = max(1, len(bank) - args.evict)
    _, ms = timed(bank.evict)
    assert len(bank) == bank.capacity
    rows.append(("evict", ms, f"{args.evict} over capacity"))

    peak = peak_mb()
    print(f"KnowledgeBank: {args.entries} entries x {args.dim} ({entry_mb:.0f} MB float32), {args.owners} owners, "
          f"{torch.get_num_threads()} threads")
    print(f"{'operation':<8} {'ms':>10}  note")
    for name, ms, note in rows:
        print(f"{name:<8} {ms:10.1f}  {note}")
    ratio = (peak - base_mb - upload_mb) / entry_mb
    print(f"peak resident memory {peak:.0f} MB: {base_mb:.0f} MB before the bank, {upload_mb:.0f} MB the seed "
          f"uploads, and {ratio:.2f}x the entries for the bank and its operations")
    if args.csv:
        shape = f"M={args.entries} d={args.dim} owners={args.owners} participation={args.participation}"
        append_csv("bank", torch.device("cpu"), shape,
                   [{"impl": name, "ms": ms, "speedup": 1.0, "note": note} for name, ms, note in rows]
                   + [{"impl": "peak_memory", "ms": 0.0, "speedup": 1.0,
                       "note": f"{ratio:.2f}x the entries, beyond the seed uploads"}],
                   path=csv_path(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
