"""Command line: `omnifm info` (versions and backends), `omnifm bench <op>`."""
import argparse
import json
import os
import runpy
import sys


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


def _bench_dir():
    """bench/ of the source checkout (the scripts are not installed with the package)."""
    for root in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()):
        path = os.path.join(root, "bench")
        if os.path.isdir(path):
            return path
    raise SystemExit("omnifm bench: run from a source checkout (bench/ not found)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="omnifm", description="OmniFM federated learning with fused ops")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, extension build, backend of every op")
    info.add_argument("--json", action="store_true")
    bench = sub.add_parser("bench", help="run bench/bench_<name>.py (extra args are passed on)")
    bench.add_argument("name", help="e.g. spectral")
    args, rest = p.parse_known_args(argv)
    if args.command == "info":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        _print_info(args.json)
    elif args.command == "bench":
        script = os.path.join(_bench_dir(), f"bench_{args.name}.py")
        if not os.path.exists(script):
            raise SystemExit(f"omnifm bench: no benchmark named {args.name!r} ({script} not found)")
        sys.argv = [script, *rest]
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
