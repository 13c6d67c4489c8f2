"""Benchmark of cosine_topk against plain PyTorch and faiss.

    python bench/bench_topk.py                 # CPU: M=200,000 d=128 B=1,024 k=2, 2 threads
    python bench/bench_topk.py --memory        # each implementation in its own process
    python bench/bench_topk.py --device cuda --bank 1000000 --dim 256 --queries 4096 --k 8

Modes. By default every implementation runs side by side in this one process (same
inputs, same warm caches) and the table gives ms, queries/s, GB/s of bank read and one
speed-up column per baseline. --memory runs each implementation in its own process
instead, so its peak memory above the inputs (max RSS on CPU, max allocated on GPU) is
its own, and adds that peak to the table.

What each implementation is given: the same float32 queries (B, d) and bank (M, d)
(--bank-dtype sets the bank's), not normalised, and it is timed from those to
(scores, indices):
  omnifm ext / omnifm triton           the fused op (CPU / CUDA), as dispatched: on a CPU
                                       with bfloat16 instructions and a large enough call,
                                       the bfloat16 screen with exact rescoring
  omnifm ext, bank prepared once       (CPU) the same with prepare_bank() outside the
                                       timed region (a bank that changes less often than
                                       it is searched)
  omnifm ext, float32 GEMM only        (CPU) the compiled kernel without the screen
  torch normalize+matmul+topk          the strongest plain PyTorch: F.normalize both,
                                       one matmul, torch.topk (forms the (B, M) matrix)
  torch.compile(normalize+matmul+topk) the same, compiled (compiled before timing)
  faiss IndexFlatIP                    (CPU only) normalise both, refill the index, search;
                                       faiss.omp_set_num_threads(--threads), as torch
  torch sort (reference, naive)        --with-reference: the op's reference, a stable
                                       sort of the full (B, M) matrix (minutes at the
                                       default shape on 2 cores)
--prenormalized gives every implementation a bank normalised once, outside the timed
region: the torch baselines then skip normalising it and faiss's index is filled once,
outside too (the fixed-index case); the fused op still computes the bank's norms.

Every answer is checked before any timing against an exact float64 top-k (the
reference's contract computed exactly): each returned score must be within a float32
bound of the true k-th largest cosines and of the true cosine of the row it names,
and each index must equal the exact one except where the two rows' true cosines tie
within that bound (faiss, like torch, rounds differently in the last bits: this
compares them fairly). An implementation that raises or answers wrong (a fused op
returning zeros, say) gets no time; the script then exits 1.
"""
import argparse
import importlib.util
import multiprocessing as mp
import os
import queue
import resource
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Failures, WrongAnswer, add_output_args, append_csv, copy_bandwidth_gbps,  # noqa: E402
                     csv_path, forced_backend, print_table, time_ms)

STRONGEST = "torch normalize+matmul+topk"
COMPILED = "torch.compile(normalize+matmul+topk)"
FAISS = "faiss IndexFlatIP"
NAIVE = "torch sort (reference, naive)"
PREPARED = "omnifm ext, bank prepared once"
FLOAT32_GEMM = "omnifm ext, float32 GEMM only"
UNIT = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def _inputs(args, device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.queries, args.dim, generator=g)
    bank = torch.randn(args.bank, args.dim, generator=g)
    if args.prenormalized:
        bank = F.normalize(bank, dim=1)
    return q.to(device), bank.to(getattr(torch, args.bank_dtype)).to(device)


def normalize_matmul_topk(q, bank, k, bank_normalized=False):
    bn = bank.float() if bank_normalized else F.normalize(bank.float(), dim=1)
    return torch.topk(F.normalize(q, dim=1) @ bn.T, k, dim=1)


def _impl(name, q, bank, args):
    """A no-argument callable returning (scores, indices) for one implementation."""
    from omnifm.ops import cosine_topk, cosine_topk_ref, prepare_bank

    k = args.k
    if name == STRONGEST:
        return lambda: normalize_matmul_topk(q, bank, k, args.prenormalized)
    if name == COMPILED:
        compiled = torch.compile(normalize_matmul_topk)
        return lambda: compiled(q, bank, k, args.prenormalized)
    if name == NAIVE:
        return lambda: cosine_topk_ref(q, bank, k)
    if name == FAISS:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        index = faiss.IndexFlatIP(args.dim)

        def fill():
            index.reset()
            index.add(F.normalize(bank.float(), dim=1).numpy())

        def search():
            scores, indices = index.search(F.normalize(q, dim=1).numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(indices)

        if args.prenormalized:
            fill()
            return search
        return lambda: (fill(), search())[1]
    if name == PREPARED:
        prepared = prepare_bank(bank)
        return lambda: cosine_topk(q, bank, k, prepared=prepared)
    if name == FLOAT32_GEMM:
        return lambda: _without_screen(lambda: cosine_topk(q, bank, k))
    backend = name.split()[-1]

    def fused():
        with forced_backend(backend):
            return cosine_topk(q, bank, k)
    return fused


def _without_screen(call):
    module = sys.modules["omnifm.ops.cosine_topk"]
    saved = dict(module.SCREEN_MIN_ROWS)
    module.SCREEN_MIN_ROWS.update({False: 1 << 62, True: 1 << 62})
    try:
        with forced_backend("ext"):
            return call()
    finally:
        module.SCREEN_MIN_ROWS.update(saved)


def exact_topk(q, bank64, k, chunk=128):
    """float64 (true cosines (B, k), indices (B, k)) of the k most similar rows, on the
    bank's device (float64 matmuls: slow on a CPU, fine on a GPU)."""
    b = bank64 / bank64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out_s, out_i = [], []
    for q0 in range(0, q.shape[0], chunk):
        qc = q[q0:q0 + chunk].double()
        qc = qc / qc.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s, i = torch.topk(qc @ b.T, k, dim=1)
        out_s.append(s)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


def true_cosines(q, bank64, indices):
    """float64 cosine of each query with the bank rows it names, (B, k)."""
    qd, rows = q.double(), bank64[indices]
    return (rows * qd[:, None]).sum(-1) / qd.norm(dim=1)[:, None].clamp_min(1e-12) / rows.norm(dim=-1).clamp_min(1e-12)


def check_topk(name, out, q, bank64, want, tol):
    """Raise WrongAnswer unless out = (scores, indices) is a correct top-k (module doc)."""
    scores, indices = (torch.as_tensor(t).to(bank64.device) for t in out)
    want_s, want_i = want
    if scores.shape != want_s.shape or indices.shape != want_i.shape:
        raise WrongAnswer(f"{name}: shapes {tuple(scores.shape)}, {tuple(indices.shape)}, want {tuple(want_s.shape)}")
    indices = indices.long()
    if not ((indices >= 0) & (indices < bank64.shape[0])).all():
        raise WrongAnswer(f"{name}: an index outside the bank")
    if (indices.sort(1).values.diff(dim=1) == 0).any():
        raise WrongAnswer(f"{name}: a row returned twice for one query")
    true = true_cosines(q, bank64, indices)
    scores = scores.double()
    for what, err in (("score vs the true k largest", (scores - want_s).abs().max().item()),
                      ("score vs its row's true cosine", (scores - true).abs().max().item())):
        if not err <= tol:  # also catches NaN
            raise WrongAnswer(f"{name}: {what} off by {err:.2e} > {tol:.1e}")
    wrong = (indices != want_i) & ((true - want_s).abs() > tol)
    if wrong.any():
        b, j = wrong.nonzero()[0].tolist()
        raise WrongAnswer(f"{name}: {int(wrong.sum())} indices differ beyond a tie, first query {b} rank {j}: "
                          f"{indices[b, j].item()} (cosine {true[b, j]:.7f}) vs "
                          f"{want_i[b, j].item()} ({want_s[b, j]:.7f})")


def _measure(name, args, device):
    """(answer, ms, peak extra bytes) of one implementation, in this process."""
    q, bank = _inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn = _impl(name, q, bank, args)
    answer = tuple(t.cpu() for t in fn())
    ms = time_ms(fn, device, args.warmup, args.repeat)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    return answer, ms, peak


def _child(name, args, out):
    torch.set_num_threads(args.threads)
    try:
        answer, ms, peak = _measure(name, args, torch.device(args.device))
        out.put((tuple(t.numpy() for t in answer), ms, peak, None))
    except Exception as exc:  # reported (and counted as a failure) by the parent
        out.put((None, None, None, f"{type(exc).__name__}: {exc}"))


def run_separate(names, args, check, failures):
    """Each implementation in its own process: answer checked here, then its time and peak."""
    results = {}
    ctx = mp.get_context("spawn")
    for name in names:
        out = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, out))
        proc.start()
        msg = None
        while msg is None and (proc.is_alive() or not out.empty()):
            try:
                msg = out.get(timeout=1)
            except queue.Empty:
                pass
        proc.join()
        if msg is None or msg[3] is not None:
            failures.add(name, RuntimeError(f"in its process: {msg[3] if msg else f'exited {proc.exitcode}'}"))
            continue
        answer, ms, peak, _ = msg
        try:
            check(name, tuple(torch.from_numpy(a) for a in answer))
        except WrongAnswer as exc:
            failures.add(name, exc)
            continue
        results[name] = (ms, peak)
    return results


def run_together(names, args, q, bank, check, failures):
    """Every implementation in this process on the same inputs: check, then time."""
    results = {}
    for name in names:
        try:
            fn = _impl(name, q, bank, args)
            check(name, fn())
        except Exception as exc:
            failures.add(name, exc)
            continue
        results[name] = (time_ms(fn, q.device, args.warmup, args.repeat), None)
    return results


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
    p.add_argument("--memory", action="store_true", help="one process per implementation, with its peak memory")
    p.add_argument("--prenormalized", action="store_true", help="every implementation gets a normalised bank")
    p.add_argument("--with-reference", action="store_true", help="also time the naive sorting reference (slow)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    add_output_args(p)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused = "omnifm triton" if device.type == "cuda" else "omnifm ext"
    # faiss is a benchmark-only dependency (pip install faiss-cpu): missing, it is skipped.
    has_faiss = device.type == "cpu" and importlib.util.find_spec("faiss") is not None
    if device.type == "cpu" and not has_faiss:
        print(f"{FAISS}: skipped, faiss is not installed (pip install faiss-cpu)")
    baselines = [STRONGEST] + ([COMPILED] if args.compile else []) + ([FAISS] if has_faiss else [])
    baselines += [NAIVE] if args.with_reference else []
    names = [fused] + ([PREPARED, FLOAT32_GEMM] if device.type == "cpu" else []) + baselines

    q, bank = _inputs(args, device)
    bank64 = bank.double()
    want = exact_topk(q, bank64, args.k)
    # Worst-case float32 error of a cosine over d features ((2d + 6) u, with room); a
    # half bank adds its unit roundoff (the Triton kernel rounds queries to its dtype).
    tol = 2 * (args.dim + 8) * UNIT["float32"] + (UNIT[args.bank_dtype] if args.bank_dtype != "float32" else 0.0)
    check = lambda name, out: check_topk(name, out, q, bank64, want, tol)  # noqa: E731
    failures = Failures()
    if args.memory:
        results = run_separate(names, args, check, failures)
    else:
        results = run_together(names, args, q, bank, check, failures)

    bank_bytes = bank.numel() * bank.element_size()
    sim_bytes = args.queries * args.bank * 4
    shape = (f"M={args.bank} d={args.dim} B={args.queries} k={args.k} bank={args.bank_dtype}"
             + (" prenormalized" if args.prenormalized else ""))
    rows = []
    for name, (ms, peak) in results.items():
        note = f"{args.queries / ms * 1e3:.0f} queries/s"
        if peak is not None:
            note += f", peak extra {peak / 2**20:.1f} MB ({100 * peak / sim_bytes:.1f}% of a B x M float32)"
        rows.append({"impl": name, "ms": ms, "gbps": bank_bytes / ms / 1e6, "note": note})
    mode = "one process each" if args.memory else "one process"
    print_table(f"cosine_topk ({shape}) on {device}, {args.threads} threads, {mode}", rows,
                [b for b in baselines if b in results])
    if device.type == "cuda":
        print(f"device copy bandwidth: {copy_bandwidth_gbps(bank_bytes, device):.0f} GB/s")
    if args.csv and rows:
        append_csv("topk", device, shape, rows, path=csv_path(args))
    failures.exit_if_any()


if __name__ == "__main__":
    main()
