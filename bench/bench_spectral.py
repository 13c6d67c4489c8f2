"""Benchmark of lowpass_spectrum and spectral_token against the eager reference.

    python bench/bench_spectral.py                      # CPU: B=64, C=3, 224x224, size=16
    python bench/bench_spectral.py --device cuda --batch 256

Times, in one run: the eager reference (fft2, shift, abs, crop, log1p, MLP...), its
torch.compile, the compiled extension (CPU) and the Triton kernel (GPU). Prints
milliseconds, speed-up over eager and GB/s of x read; appends the rows to
bench/results.csv.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import append_csv, copy_bandwidth_gbps, forced_backend, print_table, time_ms  # noqa: E402

from omnifm.nn import SpectralTokenizer  # noqa: E402
from omnifm.ops import _backend, lowpass_spectrum, lowpass_spectrum_ref, spectral_token, spectral_token_ref  # noqa: E402


def fused_backend(op, device):
    """The fast backend for this device, or None with the reason it is unavailable."""
    from omnifm.ops.info import OPS

    name = "triton" if device.type == "cuda" else "ext"
    reason = OPS[op](device.type, torch.float32)[name]()
    return name, reason


def run_fused(backend, fn):
    with forced_backend(backend):
        return fn()


def bench_op(op, eager, fused, args, device, nbytes):
    rows = []
    ms_eager = time_ms(eager, device, args.warmup, args.repeat)
    rows.append({"impl": f"{op} eager reference", "ms": ms_eager, "speedup": 1.0, "gbps": nbytes / ms_eager / 1e6})
    if args.compile:
        compiled = torch.compile(eager)
        ms = time_ms(compiled, device, args.warmup, args.repeat)
        rows.append({"impl": f"{op} torch.compile(ref)", "ms": ms, "speedup": ms_eager / ms, "gbps": nbytes / ms / 1e6})
    name, reason = fused_backend(op, device)
    if reason is None:
        ms = time_ms(lambda: run_fused(name, fused), device, args.warmup, args.repeat)
        rows.append({"impl": f"{op} {name}", "ms": ms, "speedup": ms_eager / ms, "gbps": nbytes / ms / 1e6})
    else:
        print(f"[skip] {op} {name}: {reason}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--mix-dim", type=int, default=32)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the reference")
    p.add_argument("--no-csv", dest="csv", action="store_false")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    B = args.batch or (256 if device.type == "cuda" else 64)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.rand(B, args.channels, args.height, args.width, device=device, dtype=dtype)
    tok = SpectralTokenizer(args.channels, args.size, args.mix_dim, args.hidden_dim, args.dim).to(device)
    params = [t.detach() for t in (tok.mix_weight, tok.freq_embed, tok.w1, tok.b1, tok.w2, tok.b2)]
    nbytes = x.numel() * x.element_size()
    shape = f"B={B} C={args.channels} {args.height}x{args.width} size={args.size} m={args.mix_dim} h={args.hidden_dim} d={args.dim} {args.dtype}"
    print(f"device: {device}  shape: {shape}  threads: {torch.get_num_threads()}")

    with torch.no_grad():
        rows = bench_op("lowpass_spectrum", lambda: lowpass_spectrum_ref(x, args.size, log=True),
                        lambda: lowpass_spectrum(x, args.size, log=True), args, device, nbytes)
        rows += bench_op("spectral_token", lambda: spectral_token_ref(x, *params, size=args.size),
                         lambda: spectral_token(x, *params, size=args.size), args, device, nbytes)
    if device.type == "cuda":
        bw = copy_bandwidth_gbps(nbytes, device)
        for r in rows:
            r["note"] = f"{100 * r['gbps'] / bw:.0f}% of copy bw ({bw:.0f} GB/s)"
    print_table(f"spectral ops ({shape})", rows)
    if args.csv:
        append_csv("spectral", device, shape, rows)
    return rows


if __name__ == "__main__":
    main()
