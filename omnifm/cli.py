"""Command line: `omnifm train` (a federation), `omnifm info` (versions and backends),
`omnifm bench <op>`."""
import argparse
import dataclasses
import json
import os
import runpy
import sys
import warnings


def _print_info(as_json):
    from omnifm.ops import backend_info

    info = backend_info()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    v = info["versions"]
    ext = v["omnifm_ext"]
    print(f"omnifm {__import__('omnifm').__version__}  python {v['python']}  torch {v['torch']}  "
          f"triton {v['triton'] or 'not installed'}  cuda available: {v['cuda_available']}")
    if ext["available"]:
        print(f"omnifm_ext: built with {ext['compiler']} against torch {ext['torch_built_against']}, "
              f"CUDA kernels: {'yes' if ext['cuda'] else 'no'}")
    else:
        print(f"omnifm_ext: not available ({ext['error']})")
    if info["forced"]:
        print(f"OMNIFM_BACKEND={info['forced']}")
    for op, per_device in info["ops"].items():
        print(f"\n{op}")
        for dev, choice in per_device.items():
            print(f"  {dev:<5} -> {choice['backend'] or 'none'}")
            for name, why in choice["skipped"].items():
                print(f"          {name}: {why}")
        if op in info["notes"]:
            print(f"  {info['notes'][op]}")


def _bench_dir():
    """bench/ of the source checkout (the scripts are not installed with the package)."""
    for root in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()):
        path = os.path.join(root, "bench")
        if os.path.isdir(path):
            return path
    raise SystemExit("omnifm bench: run from a source checkout (bench/ not found)")


class OneLineParser(argparse.ArgumentParser):
    """Errors as one line naming the flag (exit status 2), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


TASK_FLAGS = ("scenario", "clients", "participation", "batch_size", "lr", "image_size")


def _train_parser():
    """The parser of `omnifm train` (built only for that command: it imports the
    federation layer and the tasks, which `omnifm info` does not need)."""
    from omnifm.fl import STRATEGIES, FLConfig
    from omnifm.fl.simulation import SYNTHETIC_SAMPLES
    from omnifm.tasks import TASK_OPTIONS, TASKS, task_class

    d = FLConfig()
    lines = ["strategies: " + ", ".join(sorted(STRATEGIES)), "",
             "each task's defaults (a flag given on the command line wins):"]
    for task in sorted(TASKS):
        settings = {**{k: getattr(d, k) for k in TASK_FLAGS}, **task_class(task).defaults()}
        lines.append(f"  {task}: " + ", ".join(f"--{k.replace('_', '-')} {settings[k]}" for k in TASK_FLAGS))
    for task, options in sorted(TASK_OPTIONS.items()):
        lines.append(f"  only {task} reads " + ", ".join(f"--{k.replace('_', '-')}" for k in options))
    p = OneLineParser(prog="omnifm train", description="run a federation (in-process simulation)",
                                epilog="\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter)
    task_default = "default: the task's (below)"
    p.add_argument("--task", default=d.task, choices=sorted(TASKS))
    p.add_argument("--strategy", default=d.strategy, help="one strategy, or a comma list to compare (below)")
    p.add_argument("--data", default=d.data, help="synthetic (default) or the task's real source "
                   "(classification: medmnist; segmentation: fets; super_resolution: breakhis; fusion: atlas; "
                   "vqa: slake, vqa-rad, vqa-med (or vqa-med-2019/-2020/-2021), or several like slake+vqa-rad "
                   "from DATA_ROOT/<source>)")
    p.add_argument("--data-root", default=None, help="folder of the real data")
    p.add_argument("--scenario", default=None, help="the task's scenario (classification: hard, medium, extra; "
                   "segmentation: group1..group4, all (fets); super_resolution: tissue, magnification; fusion: pairs; "
                   f"vqa: iid, noniid, modality, dataset); {task_default}")
    p.add_argument("--clients", type=int, default=None, help=task_default)
    p.add_argument("--participation", type=float, default=None, help=f"fraction of clients per round; {task_default}")
    p.add_argument("--rounds", type=int, default=None, help=f"default {d.rounds} (with --resume: as saved)")
    p.add_argument("--local-epochs", type=int, default=None, help=f"default {d.local_epochs}")
    p.add_argument("--batch-size", type=int, default=None, help=task_default)
    p.add_argument("--lr", type=float, default=None, help=f"local SGD step size; {task_default}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--samples-per-client", type=int, default=None,
                   help=f"synthetic data: samples per client (default {SYNTHETIC_SAMPLES}); real data: a cap on each "
                   "client's samples (default: all)")
    p.add_argument("--image-size", type=int, default=None, help=task_default)
    p.add_argument("--width", type=float, default=d.width, help="backbone width factor")
    p.add_argument("--scale", type=int, default=None, help=f"super-resolution factor: 2, 4 or 8 (default {d.scale})")
    p.add_argument("--tuning", default=None, choices=("full", "lora", "adapter", "layernorm", "bias"),
                   help=f"which backbone parameters train and are shared (vqa; default {d.tuning}): lora = peft LoRA "
                   "r=8 on the attention q/v projections, adapter = bottleneck adapters after each block, layernorm / "
                   "bias = only those; the fusion block, head and OmniFM modules always train")
    p.add_argument("--vqa-model", default=None, help="vqa encoders: tiny (default, small CLIP configs built in code) "
                   "or PATH, a local save_pretrained CLIP directory with its tokenizer (never downloaded; images are "
                   "then read at the model's image size)")
    p.add_argument("--share-bn-stats", action="store_true", help="also average BN running statistics")
    p.add_argument("--lam", type=float, default=d.lam, help="SPAlign weight (0: no-SPAlign ablation)")
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument("--no-gskr", dest="gskr", action="store_false", help="ablation: mean bank embedding")
    p.add_argument("--no-eca", dest="eca", action="store_false", help="ablation: FiLM instead of ECA")
    p.add_argument("--no-psp", dest="psp", action="store_false", help="ablation: no suffix prompts")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help="evaluate every N rounds and the last (the other metrics rows carry no metrics)")
    p.add_argument("--eval-clients", type=int, default=d.eval_clients, metavar="N",
                   help="evaluate a fresh sample of N clients each time (default 0: all)")
    p.add_argument("--min-clients", type=int, default=d.min_clients,
                   help="a round with fewer usable updates (the others failed or were rejected) is not aggregated")
    p.add_argument("--client-timeout", type=float, default=d.client_timeout, metavar="SECONDS",
                   help="a client still training after SECONDS in a round is cut off and skipped that round "
                   "(default 0: no limit; with a limit, a run where a client is cut off is not reproducible)")
    p.add_argument("--extras-budget-mb", type=float, default=d.extras_budget_mb, metavar="MB",
                   help="keep at most MB of the clients' strategy state (Ditto's personal models, MOON's previous "
                   "models, SCAFFOLD's and FedDyn's per-client tensors) in memory, the rest on disk "
                   "(default 0: all in memory)")
    p.add_argument("--dp-clip", type=float, default=d.dp_clip, metavar="C",
                   help="differential privacy of uploads: clip each client's update (and each prototype to 1) to "
                   "L2 norm C and add Gaussian noise; epsilon(delta) per round in metrics.jsonl (default off)")
    p.add_argument("--dp-noise", type=float, default=d.dp_noise, metavar="SIGMA",
                   help="noise multiplier: noise std = SIGMA * C (prototypes: SIGMA)")
    p.add_argument("--dp-delta", type=float, default=d.dp_delta, help=f"delta of the reported epsilon (default {d.dp_delta:g})")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run(s) saved in DIR")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _as_flag(message):
    """'participation: ...' -> '--participation: ...' (errors name settings; users typed flags)."""
    from omnifm.fl import FLConfig

    name, sep, rest = message.partition(":")
    if sep and name in {f.name for f in dataclasses.fields(FLConfig)} | {"resume"}:
        return f"--{name.replace('_', '-')}:{rest}"
    return message


def _train(p, args):
    from omnifm.fl import STRATEGIES, FLConfig, Simulation
    from omnifm.fl.report import plot_curves, table
    from omnifm.fl.simulation import read_checkpoint
    from omnifm.tasks import config_for, task_class

    out = args.resume or args.out
    config_path = os.path.join(out, "config.json")
    try:
        if args.resume:
            if not os.path.exists(config_path):
                raise ValueError(f"--resume {out}: no config.json there")
            with open(config_path) as fh:
                saved = json.load(fh)
            strategies = saved.pop("strategies")
            base = FLConfig(**{**saved, **({"rounds": args.rounds} if args.rounds is not None else {})})
            for name in strategies:  # a damaged checkpoint is found now, not after the others ran
                path = os.path.join(out, name, "checkpoint.pt")
                if not os.path.exists(path):
                    raise ValueError(f"--resume {out}: no checkpoint of {name} ({path})")
                read_checkpoint(path)
        else:
            strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
            unknown = [s for s in strategies if s not in STRATEGIES]
            if unknown or not strategies:
                raise ValueError(f"--strategy: unknown {unknown or args.strategy!r}; choose from {', '.join(sorted(STRATEGIES))}")
            fields = {f.name for f in dataclasses.fields(FLConfig)} - {"task", "strategy"}
            base = config_for(args.task, strategy=strategies[0], **{k: v for k, v in vars(args).items() if k in fields})
        if base.clients == 1:
            warnings.warn("--clients 1: one client is not a federation (every strategy trains alone)", stacklevel=1)
        # the first run's data and model are built before anything is written: bad files fail here
        first = Simulation(dataclasses.replace(base, strategy=strategies[0]), os.path.join(out, strategies[0]))
    except (ValueError, TypeError, OSError, KeyError) as exc:
        if args.debug:
            raise
        p.error(_as_flag(str(exc)))
    os.makedirs(out, exist_ok=True)
    with open(config_path, "w") as fh:  # after --resume: the rounds now run
        json.dump({**dataclasses.asdict(base), "strategies": strategies}, fh, indent=2)
    results = {}
    for name in strategies:
        sim = first if name == strategies[0] else Simulation(dataclasses.replace(base, strategy=name),
                                                             os.path.join(out, name))
        results[name] = sim.run(resume=bool(args.resume))
        first = None  # its data and model can go
    text = table(results, f"{base.task}, {base.data} / {base.scenario}: {base.clients} clients, "
                          f"{base.participation:.0%} participation, {base.rounds} rounds, seed {base.seed}",
                 main=task_class(base.task).main_metric)
    print("\n" + text)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    plot_curves(results, os.path.join(out, "curves.png"))
    print(f"\nmetrics: {out}/<strategy>/metrics.jsonl   curves: {out}/curves.png   table: {out}/results.md")


def _audit(p, args):
    if args.public < 2 or args.steps < 1:
        p.error("audit: --public needs at least 2 images and --steps at least 1")
    if not os.path.exists(os.path.join(args.run, "config.json")):
        p.error(f"audit: --run {args.run}: no config.json there")
    from omnifm.audit import leakage, table

    try:
        result = leakage(args.run, public=args.public, steps=args.steps, seed=args.seed)
    except (ValueError, OSError) as exc:
        p.error(f"audit: {exc}")
    dp = result["dp"]
    text = table(result, f"Leakage audit of {args.run} (DP: " + (f"clip {dp['clip']:g}, noise {dp['noise']:g})"
                                                                 if dp["clip"] else "off)"))
    print(text)
    with open(os.path.join(args.run, "leakage.md"), "w") as fh:
        fh.write(text + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own parser: the light commands never import the federation layer
        p = _train_parser()
        _train(p, p.parse_args(argv[1:]))
        return 0
    p = argparse.ArgumentParser(prog="omnifm", description="OmniFM federated learning with fused ops")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="run a federation (in-process simulation); omnifm train --help for its options")
    info = sub.add_parser("info", help="versions, extension build, backend of every op")
    info.add_argument("--json", action="store_true")
    # add_help=False: `omnifm bench NAME --help` reaches the script, which shows its own options
    bench = sub.add_parser("bench", add_help=False, help="run bench/bench_<name>.py (extra args are passed on)")
    bench.add_argument("name", help="e.g. spectral")
    audit = sub.add_parser("audit", help="privacy audits of a finished run")
    audit.add_argument("what", choices=["leakage"], help="leakage: invert prototypes / spectral tokens to images")
    audit.add_argument("--run", required=True, metavar="DIR", help="a run directory holding an omnifm run")
    audit.add_argument("--public", type=int, default=512, help="the attacker's public images")
    audit.add_argument("--steps", type=int, default=400, help="training steps of the inversion network")
    audit.add_argument("--seed", type=int, default=0)
    args, rest = p.parse_known_args(argv)
    if args.command == "info":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        _print_info(args.json)
    elif args.command == "audit":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        _audit(p, args)
    elif args.command == "bench":
        script = os.path.join(_bench_dir(), f"bench_{args.name}.py")
        if not os.path.exists(script):
            raise SystemExit(f"omnifm bench: no benchmark named {args.name!r} ({script} not found)")
        sys.argv = [script, *rest]
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
