"""Benchmark of eca_attention against plain-PyTorch formulations of the same math.

    python bench/bench_eca.py                     # CPU: B=32 L=3136 d=dh=256 k=2 float32
    python bench/bench_eca.py --device cuda
    python bench/bench_eca.py --spatial           # eca_residual: x + ECA(x^T)^T, x (B, d, L)

Baselines, each given gradients for r, protos and the three weights by autograd:
- naive eager: the three projections and F.scaled_dot_product_attention; it forms the
  (B, L, dh) queries, as the textbook formula does.
- rank-k eager: the same reordering the fused op uses, in PyTorch: at = (protos Wk)
  Wq^T / sqrt(dh), vp = protos Wv, Z = softmax(r at^T) vp with torch.bmm. It reads r
  once and writes Z once, like the fused op: the strongest plain-PyTorch baseline.
- torch.compile of rank-k eager.
Then the fused op with its backend forced (ext on CPU, triton on CUDA) and as
dispatched (auto; its note says which backend ran: on CPU, forward-only calls run the
reference backend's rank-k core). Every implementation's output and gradients are
checked against the float64 reference first; a wrong or failing one gets no time and
the script exits 1. Times forward (no grad) and forward+backward; prints ms, the ratio
against every baseline and the effective bandwidth of the fused algorithm's minimal
traffic (forward: read r, write Z; backward: read r and grad, write dr), next to a
measured copy's and the time to allocate and fill a fresh Z.

--spatial times eca_residual (the adapter's spatial mode: channel-first tokens x
(B, d, L), a CNN feature map flattened, wv (d, d), y = x + Z^T) against the same math
in plain PyTorch in that layout (bmm over the k keys, the strongest eager form), its
torch.compile, and the token-major path the adapter took before (transposes around
eca_attention, whose CPU core is the fused ext kernel when recording gradients).
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Failures, add_output_args, append_csv, check_answer, copy_bandwidth_gbps,  # noqa: E402
                     csv_path, device_name, forced_backend, print_table, time_ms)

from omnifm.ops import _backend, eca_attention, eca_attention_ref, eca_residual, eca_residual_ref  # noqa: E402
from omnifm.ops.eca_attention import backend_checks  # noqa: E402

RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
NAMES = ("Z", "d r", "d protos", "d wq", "d wk", "d wv")


def naive_eager(r, protos, wq, wk, wv):
    return F.scaled_dot_product_attention(r @ wq, protos @ wk, protos @ wv)


def rank_k_eager(r, protos, wq, wk, wv):
    at = (protos @ wk) @ wq.T / math.sqrt(wq.shape[1])  # (B, k, d)
    return torch.bmm(torch.softmax(torch.bmm(r, at.transpose(1, 2)), dim=-1), protos @ wv)


def channel_first_eager(x, protos, wq, wk, wv):
    at = (protos @ wk) @ wq.T / math.sqrt(wq.shape[1])  # (B, k, d)
    return torch.baddbmm(x, (protos @ wv).transpose(1, 2), torch.softmax(torch.bmm(at, x), dim=1))


def token_major(x, protos, wq, wk, wv):
    return x + eca_attention(x.transpose(1, 2), protos, wq, wk, wv).transpose(1, 2)


def residual(backend):
    def run(*inputs):
        with forced_backend(backend):
            return eca_residual(*inputs)

    return run


def fused(backend):
    def run(*inputs):
        with forced_backend(backend):
            return eca_attention(*inputs)

    return run


def auto_backend(device, dtype, needs_grad):
    """The backend auto dispatch picks for these inputs (on CPU it depends on needs_grad)."""
    return _backend.choose(backend_checks(device.type, dtype, needs_grad), device.type).backend


def outputs_and_grads(fn, inputs, grad):
    """[Z, then the gradient of each input] of fn for the upstream gradient grad."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=3136)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--spatial", action="store_true", help="eca_residual on channel-first tokens (B, d, L)")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.k < 2:
        p.error("--k must be at least 2: with one key the softmax is constant and three gradients vanish")

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    d, dh = args.dim, args.head_dim
    if args.spatial:
        dh = d  # Z has x's width (wv is (d, d)); the head dimension of wq, wk may differ
    x_shape = (args.batch, d, args.tokens) if args.spatial else (args.batch, args.tokens, d)
    base = [torch.randn(*x_shape, generator=g), torch.randn(args.batch, args.k, d, generator=g)]
    base += [torch.randn(d, args.head_dim, generator=g) * d ** -0.5 for _ in range(2)]
    base += [torch.randn(d, dh, generator=g) * d ** -0.5]
    inputs = [t.to(device, dtype).requires_grad_() for t in base]
    grad = torch.randn(*(x_shape if args.spatial else (args.batch, args.tokens, dh)), generator=g).to(device, dtype)
    reference = eca_residual_ref if args.spatial else eca_attention_ref
    want = outputs_and_grads(reference, [t.double() for t in base], grad.double().cpu())

    fused_name = "triton" if device.type == "cuda" else "ext"
    if args.spatial:
        baselines = ["channel-first eager (bmm)"]
        impls = {baselines[0]: channel_first_eager}
        if args.compile:
            baselines.append("torch.compile(channel-first eager)")
            impls[baselines[-1]] = torch.compile(channel_first_eager)
        impls["token-major: transposes + eca_attention (auto)"] = token_major
        impls[f"omnifm eca_residual {fused_name}"] = residual(fused_name)
    else:
        baselines = ["naive eager (proj + sdpa)", "rank-k eager"]
        impls = {baselines[0]: naive_eager, baselines[1]: rank_k_eager}
        if args.compile:
            baselines.append("torch.compile(rank-k eager)")
            impls[baselines[-1]] = torch.compile(rank_k_eager)
        impls[f"omnifm {fused_name}"] = fused(fused_name)
        impls["omnifm auto"] = fused("auto")

    failures, checked = Failures(), {}
    for name, fn in impls.items():
        try:
            got = outputs_and_grads(fn, inputs, grad)
            for what, a, b in zip(NAMES, got, want):
                check_answer(f"{name} {what}", a, b, RTOL[dtype])
            with torch.no_grad():  # the forward timing runs this path, which may differ
                check_answer(f"{name} Z (no grad)", fn(*inputs), want[0], RTOL[dtype])
            checked[name] = fn
        except Exception as exc:  # a wrong answer or a crash: no time for it
            failures.add(name, exc)

    size = inputs[0].element_size()
    r_bytes, z_bytes = args.batch * args.tokens * d * size, args.batch * args.tokens * dh * size
    traffic = {"forward": r_bytes + z_bytes, "forward+backward": 3 * r_bytes + 3 * z_bytes}
    shape = f"B={args.batch} L={args.tokens} d={d} dh={dh} k={args.k} {args.dtype}" + (" channel-first" if args.spatial else "")
    print(f"device: {device_name(device)}  shape: {shape}")
    print(f"copy bandwidth (read + write): {copy_bandwidth_gbps(r_bytes, device):.1f} GB/s")
    # Every implementation allocates a fresh Z (and dr): on CPU its page faults can cost
    # more than the arithmetic, a floor no kernel removes.
    fresh = time_ms(lambda: torch.empty(args.batch, args.tokens, dh, dtype=dtype, device=device).fill_(0), device,
                    args.warmup, args.repeat)
    print(f"allocating and filling a fresh Z: {fresh:.3f} ms")
    all_rows = []
    for mode in ("forward", "forward+backward"):
        rows = []
        for name, fn in checked.items():
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
            note = f"runs {auto_backend(device, dtype, mode != 'forward')}" if name == "omnifm auto" else ""
            rows.append({"impl": name, "ms": ms, "gbps": traffic[mode] / ms / 1e6, "note": note})
        print_table(f"{'eca_residual' if args.spatial else 'eca_attention'} {mode} ({shape}) on {device}", rows,
                    baselines)
        all_rows += [{**r, "impl": f"{mode}: {r['impl']}"} for r in rows]
    if args.csv:
        append_csv("eca_residual" if args.spatial else "eca", device, shape, all_rows, path=csv_path(args))
    failures.exit_if_any()


if __name__ == "__main__":
    main()
