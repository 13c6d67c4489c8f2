"""Benchmark of eca_attention against eager attention and its torch.compile.

    python bench/bench_eca.py                     # CPU: B=32 L=3136 d=dh=256 k=2
    python bench/bench_eca.py --device cuda

Eager is what a user would write: three projections and
F.scaled_dot_product_attention. Times forward, and forward+backward (gradients for r,
protos and the three weights), prints ms and speed-up over eager, appends to
bench/results.csv.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import append_csv, forced_backend, print_table, time_ms  # noqa: E402

from omnifm.ops import eca_attention  # noqa: E402


def eager(r, protos, wq, wk, wv):
    return F.scaled_dot_product_attention(r @ wq, protos @ wk, protos @ wv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=3136)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-csv", dest="csv", action="store_false")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, dtype).requires_grad_()
    d, dh = args.dim, args.head_dim
    inputs = [mk(args.batch, args.tokens, d), mk(args.batch, args.k, d),
              mk(d, dh, sc=d ** -0.5), mk(d, dh, sc=d ** -0.5), mk(d, dh, sc=d ** -0.5)]
    grad = torch.randn(args.batch, args.tokens, dh, generator=g).to(device, dtype)
    fused_name = "triton" if device.type == "cuda" else "ext"
    impls = {"eager (proj + sdpa)": eager}
    if args.compile:
        impls["torch.compile(eager)"] = torch.compile(eager)

    def fused(*a):
        with forced_backend(fused_name):
            return eca_attention(*a)

    impls[f"omnifm {fused_name}"] = fused
    shape = f"B={args.batch} L={args.tokens} d={d} dh={dh} k={args.k} {args.dtype}"
    nbytes = (args.batch * args.tokens * (d + dh)) * inputs[0].element_size()  # read r + write Z
    rows = []
    for mode in ("forward", "forward+backward"):
        base = None
        for name, fn in impls.items():
            if mode == "forward":
                def run(fn=fn):
                    with torch.no_grad():
                        fn(*inputs)
            else:
                def run(fn=fn):
                    fn(*inputs).backward(grad)
                    for t in inputs:
                        t.grad = None
            ms = time_ms(run, device, args.warmup, args.repeat)
            base = base or ms
            rows.append({"impl": f"{mode}: {name}", "ms": ms, "speedup": base / ms,
                         "gbps": nbytes / ms / 1e6 if mode == "forward" else None})
    print_table(f"eca_attention ({shape}) on {device}", rows)
    if args.csv:
        append_csv("eca", device, shape, rows)


if __name__ == "__main__":
    main()
