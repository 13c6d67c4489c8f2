"""The federation at scale: seconds per round and peak memory as the number of clients
grows, with the participants per round fixed or growing.

    python bench/bench_scale.py                       # 100 / 1,000 clients, 10 or 100 a round
    python bench/bench_scale.py --configs 1000:0.1 --strategies omnifm
    python bench/bench_scale.py --configs 1000:0.1 --strategies ditto --rounds 5 --extras-budget-mb 32

Synthetic classification (`extra`: one modality per client), small clients (16 images
of 16x16, ResNet-18 x0.125) so that 1,000 of them fit on a laptop; rounds without
evaluation (--eval-every larger than the run), then one evaluation of --eval-clients
clients. Each configuration runs in its own process, so its peak resident memory
(ru_maxrss) is its own. A round's time should follow the participants, not the total.
"extras" is the clients' strategy state held in memory at the end (Ditto's personal
models, MOON's previous ones...); --extras-budget-mb caps it, the rest goes to disk.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_args, append_csv, csv_path  # noqa: E402

SMALL = dict(samples_per_client=16, image_size=16, width=0.125, local_epochs=1, batch_size=16)


def one(clients, participation, strategy, rounds, eval_clients, threads, extras_budget_mb=0.0):
    """Runs one configuration in this process; returns its measurements."""
    import torch

    from omnifm.fl import Simulation
    from omnifm.tasks import config_for

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = config_for("classification", strategy=strategy, clients=clients, participation=participation,
                     rounds=rounds + 1, eval_every=rounds + 1, eval_clients=eval_clients,
                     extras_budget_mb=extras_budget_mb, **SMALL)
    sim = Simulation(cfg, progress=False, log=lambda message: None)
    if sim.bank is not None:
        sim.seed_bank()
    setup = time.perf_counter() - t0
    seconds = []
    for r in range(rounds):  # no evaluation in these
        t = time.perf_counter()
        row = sim.run_round(r)
        seconds.append(time.perf_counter() - t)
        assert not row["rejected"] and "accuracy" not in row, row
    t = time.perf_counter()
    metrics = sim.evaluate(sim.eval_sample(rounds))
    evaluation = time.perf_counter() - t
    assert 0 <= metrics["accuracy"] <= 1
    return {"clients": clients, "participants": len(row["clients"]), "strategy": strategy, "setup_s": setup,
            "s_per_round": sum(seconds) / len(seconds), "eval_s": evaluation, "eval_clients": eval_clients,
            "bank": len(sim.bank) if sim.bank is not None else 0, "extras_mb": extras_mb(sim),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def extras_mb(sim):
    from omnifm.fl.client import tensor_bytes
    from omnifm.fl.extras_store import OnDisk

    return sum(tensor_bytes(c.extra) for c in sim.clients if not isinstance(c.extra, OnDisk)) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="100:0.1,1000:0.01,1000:0.1", help="CLIENTS:PARTICIPATION,...")
    p.add_argument("--strategies", default="fedavg,omnifm")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (no evaluation in them)")
    p.add_argument("--eval-clients", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extras-budget-mb", type=float, default=0.0, help="FLConfig.extras_budget_mb (0: no cap)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    add_output_args(p)
    args = p.parse_args(argv)
    if args.one:
        clients, participation, strategy = args.one.split(":")
        print(json.dumps(one(int(clients), float(participation), strategy, args.rounds, args.eval_clients,
                             args.threads, args.extras_budget_mb)))
        return 0
    try:
        configs = [(int(c), float(q)) for c, q in (item.split(":") for item in args.configs.split(","))]
    except ValueError:
        p.error(f"--configs: expected CLIENTS:PARTICIPATION pairs, got {args.configs!r}")
    results = []
    for clients, participation in configs:
        for strategy in args.strategies.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{clients}:{participation}:{strategy}",
                   "--rounds", str(args.rounds), "--eval-clients", str(args.eval_clients),
                   "--threads", str(args.threads), "--extras-budget-mb", str(args.extras_budget_mb), "--no-csv"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{r['clients']:>6} clients {r['participants']:>4} a round {r['strategy']:<7} "
                  f"setup {r['setup_s']:6.1f} s  {r['s_per_round']:6.2f} s/round  "
                  f"eval of {r['eval_clients']} clients {r['eval_s']:5.1f} s  bank {r['bank']:>5}  "
                  f"extras {r['extras_mb']:6.1f} MB  peak {r['peak_mb']:6.0f} MB", flush=True)
    if args.csv:
        rows = [{"impl": f"{r['strategy']} {r['clients']} clients {r['participants']} a round",
                 "ms": r["s_per_round"] * 1e3, "speedup": 1.0,
                 "note": f"setup {r['setup_s']:.1f} s, eval {r['eval_s']:.1f} s, extras {r['extras_mb']:.1f} MB "
                         f"(budget {args.extras_budget_mb:g}), peak {r['peak_mb']:.0f} MB"}
                for r in results]
        import torch

        append_csv("scale", torch.device("cpu"), f"classification extra {SMALL}", rows, path=csv_path(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
