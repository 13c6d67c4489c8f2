"""Shared timing, table and CSV helpers of the bench/ scripts."""
import contextlib
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch

RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.csv")  # tracked: the record
LOCAL_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "local_results.csv")  # untracked


def add_output_args(parser):
    """--no-csv / --record: where a run's rows go. By default to the untracked
    bench/local_results.csv, so running a benchmark never changes a tracked file."""
    parser.add_argument("--no-csv", dest="csv", action="store_false", help="write no csv rows")
    parser.add_argument("--record", action="store_true",
                        help="append the rows to bench/results.csv (tracked, the project's record) instead of "
                        "bench/local_results.csv")


def csv_path(args):
    return RESULTS_CSV if args.record else LOCAL_CSV
CSV_FIELDS = ["date", "bench", "device", "torch", "triton", "threads", "shape", "impl", "ms", "speedup", "gbps", "note"]


@contextlib.contextmanager
def forced_backend(name):
    """Run the body with OMNIFM_BACKEND=name (restoring what was there)."""
    old = os.environ.get("OMNIFM_BACKEND")
    os.environ["OMNIFM_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMNIFM_BACKEND", None)
        else:
            os.environ["OMNIFM_BACKEND"] = old


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_ms(fn, device, warmup=3, repeat=10):
    """Median wall time of fn() in milliseconds (synchronising on GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes, device):
    """Measured device-to-device copy bandwidth (read + write) for a buffer of nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


class WrongAnswer(Exception):
    """An implementation's output disagrees with the reference: it gets no time."""


def rel_error(out, ref):
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return float("inf")
    denom = ref.norm()
    if denom == 0:
        raise ValueError("reference is all zeros: nothing to compare against")
    return ((out - ref).norm() / denom).item()


def check_answer(name, out, ref, rtol):
    """Raise WrongAnswer unless out matches ref within rtol (relative, in norm)."""
    err = rel_error(out, ref)
    if not err <= rtol:  # also catches NaN
        raise WrongAnswer(f"{name}: relative error {err:.3e} > {rtol:.1e} against the reference")
    return err


class Failures:
    """Collects implementations that raised or answered wrong; the script then exits 1,
    so a broken fast path can never pass as a slow or a fast one."""

    def __init__(self):
        self.items = []

    def add(self, name, exc):
        msg = f"{name}: {type(exc).__name__}: {exc}"
        self.items.append(msg)
        print(f"FAILED {msg}", file=sys.stderr)

    def exit_if_any(self):
        if self.items:
            print(f"{len(self.items)} implementation(s) failed; no time is reported for them:", file=sys.stderr)
            for msg in self.items:
                print(f"  {msg}", file=sys.stderr)
            sys.exit(1)


def print_table(title, rows, baselines):
    """rows: dicts with impl, ms, gbps (or None), note. One ratio column per baseline
    (baseline ms / impl ms, > 1 means faster than that baseline); sets r['speedup']
    to the ratio against the fastest baseline (the strongest), which goes to the CSV."""
    base_ms = {r["impl"]: r["ms"] for r in rows if r["impl"] in baselines}
    strongest = min(base_ms, key=base_ms.get) if base_ms else None
    print(f"\n{title}")
    head = "".join(f" {'x ' + b[:14]:>16}" for b in base_ms)
    print(f"{'impl':<34} {'ms':>10}{head} {'GB/s':>8}  note")
    for r in rows:
        ratios = "".join(f" {base_ms[b] / r['ms']:>15.2f}x" for b in base_ms)
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") is not None else "-"
        print(f"{r['impl']:<34} {r['ms']:>10.3f}{ratios} {gbps:>8}  {r.get('note', '')}")
        r["speedup"] = base_ms[strongest] / r["ms"] if strongest else float("nan")
    if strongest:
        print(f"(x <baseline> = that baseline's time / this time; the CSV speed-up is against the strongest "
              f"baseline, {strongest})")


def append_csv(bench, device, shape, rows, path=RESULTS_CSV):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "bench": bench,
                "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
                "threads": torch.get_num_threads(), "shape": shape, "impl": r["impl"],
                "ms": f"{r['ms']:.4f}", "speedup": f"{r['speedup']:.3f}",
                "gbps": "" if r.get("gbps") is None else f"{r['gbps']:.2f}", "note": r.get("note", ""),
            })
