"""The paper's Table 1 grid: scenarios x participation x strategies, on the synthetic
cross-modality data (or MedMNIST with --data medmnist --data-root DIR).

    python scripts/table1.py --quick --out runs/table1

Scenarios: hard (Dirichlet gamma=0.1), medium (gamma=0.5), extra (one modality per
client); participation 20/50/100 %. Writes table1.md (accuracy / macro-F1 of the last
round, one row per strategy) and table1.csv (every run).
"""
import argparse
import csv
import dataclasses
import os
import sys
import time

from omnifm.fl import STRATEGIES, FLConfig, Simulation

ORDER = ["local", "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "feddyn", "scaffold", "moon", "ditto",
         "fedper", "fedrep", "omnifm"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models, data and rounds (minutes on 2 cores)")
    p.add_argument("--strategies", default=",".join(ORDER))
    p.add_argument("--scenarios", default="hard,medium,extra")
    p.add_argument("--participation", default="0.2,0.5,1.0")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="synthetic", choices=["synthetic", "medmnist"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="runs/table1")
    args = p.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    for s in strategies:
        if s not in STRATEGIES:
            raise SystemExit(f"table1: unknown strategy {s!r}")
    base = FLConfig(data=args.data, data_root=args.data_root, seed=args.seed, rounds=20)
    if args.quick:
        base = dataclasses.replace(base, clients=10, rounds=8, samples_per_client=48, image_size=16, width=0.125)
    if args.rounds:
        base = dataclasses.replace(base, rounds=args.rounds)
    os.makedirs(args.out, exist_ok=True)
    cells = [(sc, float(pa)) for sc in args.scenarios.split(",") for pa in args.participation.split(",")]
    results, t0 = {}, time.time()
    with open(os.path.join(args.out, "table1.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["scenario", "participation", "strategy", "rounds", "accuracy", "f1", "seconds"])
        for sc, pa in cells:
            for s in strategies:
                cfg = dataclasses.replace(base, strategy=s, scenario=sc, participation=pa)
                t = time.time()
                last = Simulation(cfg, progress=False, log=lambda m: None).run()[-1]
                results[(sc, pa, s)] = last
                w.writerow([sc, pa, s, last["round"], f"{last['accuracy']:.4f}", f"{last['f1']:.4f}",
                            f"{time.time() - t:.1f}"])
                fh.flush()
                print(f"[{time.time() - t0:7.0f}s] {sc:<6} {pa:>4.0%} {s:<9} acc {last['accuracy']:.3f} "
                      f"f1 {last['f1']:.3f}", file=sys.stderr)
    head = "| strategy | " + " | ".join(f"{sc} {pa:.0%}" for sc, pa in cells) + " |"
    lines = [f"Accuracy / macro-F1 after {base.rounds} rounds ({base.data}, {base.clients} clients, "
             f"{base.samples_per_client} samples each, seed {base.seed}{', --quick' if args.quick else ''})", "",
             head, "|---" * (len(cells) + 1) + "|"]
    for s in strategies:
        lines.append(f"| {s} | " + " | ".join(f"{results[(sc, pa, s)]['accuracy']:.3f} / {results[(sc, pa, s)]['f1']:.3f}"
                                              for sc, pa in cells) + " |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "table1.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
