"""Cost of one federated round: OmniFM against FedAvg with the same backbone.

    python bench/bench_round.py                  # 10 clients, 50% participation, 3 timed rounds
    python bench/bench_round.py --task segmentation

Runs the in-process simulation for each strategy (same task, data, seed and backbone),
times rounds after a warm-up round, alternating the strategies round by round, and
prints the median seconds per round and the median of the per-round ratios to FedAvg (target: OmniFM <= 1.2x). Any task, with its own default scenario and image
size. Appends to bench/results.csv.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_args, append_csv, csv_path  # noqa: E402

from omnifm.fl import Simulation  # noqa: E402
from omnifm.tasks import TASKS, config_for  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="classification", choices=sorted(TASKS))
    p.add_argument("--strategies", default="fedavg,omnifm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=None, help="default: the task's (10 for classification)")
    p.add_argument("--width", type=float, default=None, help="backbone width multiplier (default: the task's)")
    p.add_argument("--participation", type=float, default=None,
                   help="default: 0.5 for classification, the task's own otherwise")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.participation is None and args.task == "classification":
        args.participation = 0.5  # the README's main job
    names = args.strategies.split(",")
    sims = {}
    for name in names:
        cfg = config_for(args.task, strategy=name, clients=args.clients, participation=args.participation,
                         width=args.width, rounds=args.rounds + 1)
        sims[name] = sim = Simulation(cfg, progress=False)
        if sim.bank is not None:
            sim.seed_bank()
        sim.run_round(0)  # warm-up
    # Rounds alternate between the strategies, so a change in the machine's speed
    # (other processes, frequency) hits all of them alike and the ratio stays fair.
    # The ratio reported is the median over rounds of (this strategy's round / the
    # first's round of the same r): a burst of load on a shared machine moves one pair.
    seconds = {name: [] for name in names}
    for r in range(1, args.rounds + 1):
        for name in names:
            t0 = time.perf_counter()
            sims[name].run_round(r)
            seconds[name].append(time.perf_counter() - t0)
    rows, first = [], seconds[names[0]]
    for name in names:
        s = statistics.median(seconds[name])
        ratio = statistics.median(t / b for t, b in zip(seconds[name], first))
        rows.append({"impl": name, "ms": s * 1e3, "speedup": 1 / ratio, "note": f"{ratio:.2f}x the first"})
        print(f"{name:<10} {s:8.2f} s/round (median of {args.rounds})   {ratio:5.2f}x {names[0]} "
              f"(median of the per-round ratios; each: {' '.join(f'{t / b:.2f}' for t, b in zip(seconds[name], first))})")
    if args.csv:
        append_csv("round", torch.device("cpu"), f"task={args.task} clients={cfg.clients} "
                   f"participation={cfg.participation} width={cfg.width} "
                   f"(training + personalised evaluation of every client)", rows, path=csv_path(args))


if __name__ == "__main__":
    main()
