"""Cost of one federated round: OmniFM against FedAvg with the same backbone.

    python bench/bench_round.py                  # 10 clients, 50% participation, 3 timed rounds
    python bench/bench_round.py --task segmentation

Runs the in-process simulation for each strategy (same task, data, seed and backbone),
times rounds after a warm-up round, and prints seconds per round and the ratio to
FedAvg (target: OmniFM <= 1.2x). Any task, with its own default scenario and image
size. Appends to bench/results.csv.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import append_csv  # noqa: E402

from omnifm.fl import FLConfig, Simulation  # noqa: E402
from omnifm.tasks import TASKS, task_class  # noqa: E402


def seconds_per_round(cfg, rounds):
    sim = Simulation(cfg, progress=False)
    if sim.bank is not None:
        sim.seed_bank()
    sim.run_round(0)  # warm-up
    t0 = time.perf_counter()
    for r in range(1, rounds + 1):
        sim.run_round(r)
    return (time.perf_counter() - t0) / rounds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="classification", choices=sorted(TASKS))
    p.add_argument("--strategies", default="fedavg,omnifm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=None, help="default: the task's (10 for classification)")
    p.add_argument("--participation", type=float, default=0.5)
    p.add_argument("--no-csv", dest="csv", action="store_false")
    args = p.parse_args(argv)
    rows, base = [], None
    for name in args.strategies.split(","):
        settings = {**task_class(args.task).defaults(), **({"clients": args.clients} if args.clients else {})}
        cfg = FLConfig(task=args.task, strategy=name, participation=args.participation, rounds=args.rounds + 1,
                       **settings)
        s = seconds_per_round(cfg, args.rounds)
        base = base or s
        rows.append({"impl": name, "ms": s * 1e3, "speedup": base / s, "note": f"{s / base:.2f}x the first"})
        print(f"{name:<10} {s:8.2f} s/round   {s / base:5.2f}x {args.strategies.split(',')[0]}")
    if args.csv:
        append_csv("round", torch.device("cpu"), f"task={args.task} clients={cfg.clients} "
                   f"participation={args.participation} "
                   f"(training + personalised evaluation of every client)", rows)


if __name__ == "__main__":
    main()
