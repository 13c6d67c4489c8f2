"""Shared timing, table and CSV helpers of the bench/ scripts."""
import contextlib
import csv
import datetime
import os
import platform
import statistics
import time

import torch

RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.csv")
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


def print_table(title, rows):
    """rows: dicts with impl, ms, speedup, gbps, note."""
    print(f"\n{title}")
    print(f"{'impl':<34} {'ms':>10} {'vs eager':>9} {'GB/s':>8}  note")
    for r in rows:
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") is not None else "-"
        print(f"{r['impl']:<34} {r['ms']:>10.3f} {r['speedup']:>8.2f}x {gbps:>8}  {r.get('note', '')}")


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
