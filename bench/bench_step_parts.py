"""Where OmniFM's extra time per training step goes: one local SGD step of a task's
backbone under FedAvg, under OmniFM, and under OmniFM with one part taken out.

    python bench/bench_step_parts.py --task super_resolution
    python bench/bench_step_parts.py --task vqa --reps 24

Variants (each its own model, built from the same seed and data after one warm-up
round of the simulation):
- fedavg: the plain backbone;
- omnifm: the adapter as it trains (tokenizer, retrieval, ECA fusion, lambda * SPAlign);
- no tokenizer: fixed, detached spectral tokens (no tokenizer forward or backward);
- no fusion: the hook hands the layer's output on unchanged;
- no retrieval: fixed prototypes (no top-k, counts or gather);
- no SPAlign: lambda = 0 (no alignment term; the tokenizer then gets no gradient);
- bare: all of the above removed (what is left is the wrapper itself).
The variants compute different things on purpose (they are ablations), so no answer
is compared; the step times are. Steps run in rounds that alternate between the
variants, so a change in the machine's speed hits all of them alike; each variant's
time is the mean of its middle half of rounds (ms per step).
"""
import argparse
import statistics
import time

import torch

from omnifm.fl import Simulation
from omnifm.tasks import TASKS, config_for

VARIANTS = ("fedavg", "omnifm", "no tokenizer", "no fusion", "no retrieval", "no SPAlign", "bare")


def batch_size(x):
    return len(next(iter(x.values()))) if isinstance(x, dict) else x.shape[0]


def prepare(task, variant, lam, steps):
    """(step function, batches) of one variant."""
    cfg = config_for(task, strategy="fedavg" if variant == "fedavg" else "omnifm", rounds=2)
    sim = Simulation(cfg, progress=False)
    if sim.bank is not None:
        sim.seed_bank()
    sim.run_round(0)
    model = sim.model
    batches = [b for b in sim.clients[0].batches(1, cfg.batch_size, 0)][:steps]
    batches = [b for b in batches if batch_size(b[0]) == batch_size(batches[0][0])]
    if variant != "fedavg":
        model.set_bank(sim.bank.entries)
        x0 = batches[0][0]
        with torch.no_grad():
            s0 = model.tokenizer(x0)
            p0 = model.retrieve(s0)
        if variant in ("no tokenizer", "bare"):
            model.tokenizer.forward = lambda x: s0
        if variant in ("no retrieval", "bare"):
            model.retrieve = lambda s: p0
        if variant in ("no fusion", "bare"):
            model._handle.remove()
        if variant in ("no SPAlign", "bare"):
            lam = 0.0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9,
                          weight_decay=5e-4)
    model.train()

    def step(x, y):
        loss = sim.task.loss(model(x), y)
        if lam:
            loss = loss + lam * model.alignment_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="super_resolution", choices=sorted(TASKS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=16, help="steps per round of a variant")
    p.add_argument("--reps", type=int, default=16, help="rounds over all variants")
    p.add_argument("--lam", type=float, default=0.1, help="the SPAlign weight (the simulation's default)")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    runs = {v: prepare(args.task, v, args.lam, args.steps) for v in names}
    times = {v: [] for v in names}
    for _ in range(args.reps):
        for v in names:
            step, batches = runs[v]
            t0 = time.perf_counter()
            for x, y in batches:
                step(x, y)
            times[v].append((time.perf_counter() - t0) / len(batches) * 1e3)
    base = None
    print(f"task={args.task}  ms per training step (mean of the middle half of {args.reps} rounds; "
          "paired: median over rounds of the round's ratio to fedavg's)")
    for v in names:
        t = sorted(times[v])
        mid = t[len(t) // 4: len(t) - len(t) // 4] or t
        ms = sum(mid) / len(mid)
        base = ms if v == "fedavg" else base
        rel = f"   {ms / base:5.2f}x fedavg" if base else ""
        if "fedavg" in times and v != "fedavg":
            rel += f"   paired {statistics.median(a / b for a, b in zip(times[v], times['fedavg'])):5.3f}x"
        print(f"{v:<14} {ms:8.2f}{rel}")


if __name__ == "__main__":
    main()
