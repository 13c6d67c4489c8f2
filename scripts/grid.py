"""The paper's experiment grids, several seeds per cell, mean ± std.

    python scripts/grid.py table1 --quick --seeds 0,1,2 --out runs/table1   # classification
    python scripts/grid.py table2 --quick --seeds 0,1,2 --out runs/table2   # super-resolution
    python scripts/grid.py table4 --quick --seeds 0,1,2 --out runs/table4   # VQA
    python scripts/grid.py table5 --quick --seeds 0,1,2 --out runs/table5   # VQA tuning regimes
    python scripts/grid.py table6 --quick --seeds 0,1,2 --out runs/table6   # segmentation
    python scripts/grid.py table7 --quick --seeds 0,1,2 --out runs/table7   # fusion

table1: classification, scenarios hard / medium / extra x participation 20/50/100 %.
table2: super-resolution, scenarios tissue / magnification x scale 2/4/8.
table4: VQA, scenarios iid / noniid / dataset (synthetic: three datasets of disjoint modalities).
table5: VQA, tuning regimes full / lora / adapter / layernorm / bias (scenario iid, the task's default).
table6: segmentation, institution groups group1..group4 (9/6/5/3 clients).
table7: fusion, the task's synthetic pairs (client 1 CT-MRI, 2 PET-MRI, 3 SPECT-MRI).

Every run goes to <out>/runs.csv as soon as it ends; a rerun with the same --out skips
the runs already there, so an interrupted grid continues where it stopped. The table
(<out>/table.md, also printed) gives the last round's main metrics as mean ± std over
the seeds (sample std): the task's first two metrics, or the preset's `shown` ones
(VQA: accuracy next to majority, the always-the-commonest-answer baseline). Narrow a
grid with --strategies, --cell KEY=V1,V2 (e.g. --cell scenario=extra --cell
participation=0.2) and change any setting with --set KEY=VALUE (e.g. --set
rounds=30). --jobs N runs N runs at once, each on cores/N threads.
"""
import argparse
import concurrent.futures
import csv
import dataclasses
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
import types

from omnifm.fl import STRATEGIES, FLConfig
from omnifm.tasks import config_for, get_task, task_class

PAPER_BASELINES = ["local", "fedavg", "fedprox", "feddyn", "fedper", "omnifm"]
VQA_BASELINES = ["fedavg", "fedprox", "fedadam", "feddyn", "fedper", "omnifm"]
# VQA --quick: ~20-40 s a run on one thread; every strategy is still learning at round 15, so 20
VQA_QUICK = dict(rounds=20, samples_per_client=96, image_size=32, width=0.125)
TABLES = {
    "table1": dict(task="classification", cells={"scenario": ["hard", "medium", "extra"],
                                                 "participation": [0.2, 0.5, 1.0]},
                   strategies=["local", "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "feddyn", "scaffold",
                               "moon", "ditto", "fedper", "fedrep", "omnifm"],
                   quick=dict(clients=10, rounds=8, samples_per_client=48, image_size=16, width=0.125)),
    "table2": dict(task="super_resolution", cells={"scenario": ["tissue", "magnification"], "scale": [2, 4, 8]},
                   strategies=PAPER_BASELINES,
                   quick=dict(rounds=20, samples_per_client=48, image_size=48)),
    "table4": dict(task="vqa", cells={"scenario": ["iid", "noniid", "dataset"]}, strategies=VQA_BASELINES,
                   quick=VQA_QUICK, shown=["accuracy", "majority"]),
    "table5": dict(task="vqa", cells={"tuning": ["full", "lora", "adapter", "layernorm", "bias"]},
                   strategies=VQA_BASELINES, quick=VQA_QUICK, shown=["accuracy", "majority"]),
    "table6": dict(task="segmentation", cells={"scenario": ["group1", "group2", "group3", "group4"]},
                   strategies=PAPER_BASELINES,
                   quick=dict(rounds=12, samples_per_client=48, image_size=32)),
    "table7": dict(task="fusion", cells={"scenario": ["pairs"]},
                   strategies=["fedavg", "fedprox", "ditto", "feddyn", "moon", "omnifm"],
                   quick=dict(rounds=10, samples_per_client=32, image_size=48)),
}
FIELDS = {f.name: f.type for f in dataclasses.fields(FLConfig)}


def parse_value(key, text):
    if key not in FIELDS or key == "task":
        raise SystemExit(f"grid: unknown setting {key!r}; choose from {sorted(set(FIELDS) - {'task'})}")
    kind = FIELDS[key]
    if isinstance(kind, types.UnionType):  # `int | None`: the value's type is the one that is not None
        kind = next(t for t in kind.__args__ if t is not type(None))
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"grid: {key} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text) if kind in (int, float) else text
    except ValueError:
        raise SystemExit(f"grid: {key}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def run_one(cfg, threads):
    import torch

    from omnifm.fl import Simulation

    torch.set_num_threads(threads)
    t = time.time()
    last = Simulation(cfg, progress=False, log=lambda message: None).run()[-1]
    return last, time.time() - t


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--quick", action="store_true", help="small models, data and rounds (minutes on 2 cores)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default=None, help="comma list (default: the table's)")
    p.add_argument("--cell", action="append", default=[], metavar="KEY=V1,V2", help="restrict one axis of the grid")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one setting of every run")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=None, help="default runs/<table>")
    args = p.parse_args(argv)
    spec = TABLES[args.table]
    out = args.out or os.path.join("runs", args.table)
    strategies = args.strategies.split(",") if args.strategies else spec["strategies"]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"grid: unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"grid: --seeds takes integers, got {args.seeds!r}") from None
    if args.jobs < 1:
        raise SystemExit(f"grid: --jobs must be at least 1, got {args.jobs}")
    axes = dict(spec["cells"])
    for item in args.cell:
        key, _, values = item.partition("=")
        if key not in axes:
            raise SystemExit(f"grid: --cell {key!r} is not an axis of {args.table} ({', '.join(axes)})")
        axes[key] = [parse_value(key, v) for v in values.split(",")]
    settings = dict(spec["quick"]) if args.quick else {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key in axes or key in ("strategy", "seed"):
            raise SystemExit(f"grid: --set {key} is the grid's own axis; use "
                             + ("--strategies" if key == "strategy" else "--seeds" if key == "seed" else "--cell"))
        settings[key] = parse_value(key, value)

    cells = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    task = spec["task"]
    configs = {(tuple(c.values()), s, seed): config_for(task, **settings, **c, strategy=s, seed=seed)
               for c in cells for s in strategies for seed in seeds}
    metrics = list(task_class(task).metrics)
    for c in cells:  # a bad cell fails here, in one line, before anything is written or run
        cfg = configs[(tuple(c.values()), strategies[0], seeds[0])]
        try:
            get_task(task, cfg).federation()
        except (ValueError, TypeError, OSError) as exc:
            raise SystemExit(f"grid: cell {' '.join(f'{k}={v}' for k, v in c.items())}: {exc}") from None
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "runs.csv")
    # runs.csv only resumes the grid it was made by: same table, same settings
    stamp = {"table": args.table, "settings": settings}
    stamp_path = os.path.join(out, "settings.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as fh:
            saved = json.load(fh)
        if saved != stamp:
            raise SystemExit(f"grid: {out} holds runs of {saved['table']} with settings {saved['settings']}, "
                             f"not {stamp['settings']}; choose another --out")
    elif os.path.exists(csv_path):
        raise SystemExit(f"grid: {csv_path} has no settings.json beside it; choose another --out")
    else:
        with open(stamp_path, "w") as fh:
            json.dump(stamp, fh)
    header = [*axes, "strategy", "seed", "rounds", *metrics, "seconds"]
    done = {}
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and list(rows[0]) != header:
            raise SystemExit(f"grid: {csv_path} has other columns than this grid; choose another --out")
        for row in rows:
            cell = tuple(parse_value(k, row[k]) for k in axes)
            done[(cell, row["strategy"], int(row["seed"]))] = {m: float(row[m]) for m in metrics}
    todo = [key for key in configs if key not in done]
    print(f"{args.table}: {len(configs)} runs, {len(configs) - len(todo)} already in {csv_path}", file=sys.stderr)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.time()
    # spawn, not fork: a child forked after this process ran torch's thread pool (the
    # cell checks above) can hang in it
    spawn = multiprocessing.get_context("spawn")
    with open(csv_path, "a", newline="") as fh, concurrent.futures.ProcessPoolExecutor(args.jobs, spawn) as pool:
        writer = csv.writer(fh)
        if fh.tell() == 0:
            writer.writerow(header)
        futures = {pool.submit(run_one, configs[key], threads): key for key in todo}
        for future in concurrent.futures.as_completed(futures):
            cell, strategy, seed = key = futures[future]
            try:
                last, seconds = future.result()
            except Exception as exc:  # the finished runs are kept; the queued ones are not started
                pool.shutdown(wait=True, cancel_futures=True)
                raise SystemExit(f"grid: {' '.join(map(str, cell))} {strategy} seed {seed} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            done[key] = {m: last[m] for m in metrics}
            writer.writerow([*cell, strategy, seed, last["round"], *(f"{last[m]:.6f}" for m in metrics),
                             f"{seconds:.1f}"])
            fh.flush()
            print(f"[{time.time() - t0:6.0f}s] {' '.join(map(str, cell))} {strategy:<8} seed {seed} "
                  + " ".join(f"{m} {last[m]:.4f}" for m in metrics), file=sys.stderr)

    example = next(iter(configs.values()))
    shown = spec.get("shown", metrics[:2])
    lines = [f"{task}: last-round {' / '.join(shown)}, mean ± std over seeds {args.seeds} "
             f"({example.data}, {example.rounds} rounds, {example.synthetic_samples} samples per client, "
             f"image {example.image_size}, width {example.width}{', --quick' if args.quick else ''})", "",
             "| strategy | " + " | ".join(" ".join(str(v) for v in c.values()) for c in cells) + " |",
             "|---" * (len(cells) + 1) + "|"]
    extra = [m for m in metrics[2:] if m.endswith("_bicubic")]  # the strategy-free reference answer
    for name in strategies + extra:
        row = []
        for c in cells:
            runs = [done[(tuple(c.values()), s, seed)] for s in ([name] if name in strategies else strategies[:1])
                    for seed in seeds]
            row.append(" / ".join(mean_std([r[m] for r in runs]) for m in ([name] if name in extra else shown)))
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    text = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
