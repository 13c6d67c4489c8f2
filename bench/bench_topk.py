"""Benchmark of cosine_topk against torch (matmul + topk) and faiss (IndexFlatIP).

    python bench/bench_topk.py                          # CPU: M=200,000 d=128 B=1,024 k=2
    python bench/bench_topk.py --device cuda --bank 1000000 --dim 256 --queries 4096 --k 8

Each implementation runs in its own process, so its peak memory above the inputs
(max RSS on CPU, max allocated on GPU) is its own. Reports ms, queries/s, GB/s of bank
read and that peak; appends to bench/results.csv. faiss gets normalised copies of the
vectors (IndexFlatIP is inner product), built outside the timed region.
"""
import argparse
import multiprocessing as mp
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import append_csv, copy_bandwidth_gbps, time_ms  # noqa: E402


def _inputs(args, device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.queries, args.dim, generator=g)
    bank = torch.randn(args.bank, args.dim, generator=g).to(getattr(torch, args.bank_dtype))
    return q.to(device), bank.to(device)


def _impl(name, q, bank, k):
    from omnifm.ops import cosine_topk, cosine_topk_ref

    if name == "torch matmul+topk":
        def run():
            qn = torch.nn.functional.normalize(q, dim=1)
            bn = torch.nn.functional.normalize(bank.float(), dim=1)
            return torch.topk(qn @ bn.T, k, dim=1)
        return run
    if name == "reference (sort)":
        return lambda: cosine_topk_ref(q, bank, k)
    if name.startswith("faiss"):
        import faiss

        bn = torch.nn.functional.normalize(bank.float(), dim=1).cpu().numpy()
        qn = torch.nn.functional.normalize(q, dim=1).cpu().numpy()
        index = faiss.IndexFlatIP(bn.shape[1])
        index.add(bn)
        return lambda: index.search(qn, k)
    backend = name.split()[-1]
    os.environ["OMNIFM_BACKEND"] = backend
    return lambda: cosine_topk(q, bank, k)


def _child(name, args, out):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    q, bank = _inputs(args, device)
    try:
        fn = _impl(name, q, bank, args.k)
    except ImportError as exc:
        out.put((name, None, f"skipped: {exc}"))
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ms = time_ms(fn, device, args.warmup, args.repeat)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    out.put((name, ms, peak))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bank", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--bank-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--with-reference", action="store_true", help="also time the sorting reference")
    p.add_argument("--no-csv", dest="csv", action="store_false")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    fused = "omnifm triton" if device.type == "cuda" else "omnifm ext"
    names = ["torch matmul+topk", "faiss IndexFlatIP", fused]
    if args.with_reference:
        names.insert(1, "reference (sort)")
    ctx = mp.get_context("spawn")
    results = {}
    for name in names:
        out = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, out))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            results[name] = (None, f"failed (exit {proc.exitcode})")
            continue
        _, ms, peak = out.get()
        results[name] = (ms, peak)

    bank_bytes = args.bank * args.dim * torch.tensor([], dtype=getattr(torch, args.bank_dtype)).element_size()
    sim_bytes = args.queries * args.bank * 4
    shape = f"M={args.bank} d={args.dim} B={args.queries} k={args.k} bank={args.bank_dtype}"
    print(f"\ncosine_topk ({shape}) on {device}, {args.threads} threads")
    print(f"{'impl':<22} {'ms':>10} {'queries/s':>11} {'bank GB/s':>10} {'peak extra MB':>14} {'% of BxM f32':>13}")
    base_ms = results["torch matmul+topk"][0]
    rows = []
    for name, (ms, peak) in results.items():
        if ms is None:
            print(f"{name:<22} {peak}")
            continue
        gbps = bank_bytes / ms / 1e6
        print(f"{name:<22} {ms:>10.2f} {args.queries / ms * 1e3:>11.0f} {gbps:>10.2f} {peak / 2**20:>14.1f} "
              f"{100 * peak / sim_bytes:>12.1f}%")
        rows.append({"impl": name, "ms": ms, "speedup": (base_ms / ms) if base_ms else float("nan"), "gbps": gbps,
                     "note": f"peak extra {peak / 2**20:.1f} MB"})
    if device.type == "cuda":
        bw = copy_bandwidth_gbps(bank_bytes, device)
        print(f"device copy bandwidth: {bw:.0f} GB/s")
    print("(speed-up column in results.csv is relative to torch matmul+topk)")
    if args.csv:
        append_csv("topk", device, shape, rows)


if __name__ == "__main__":
    main()
