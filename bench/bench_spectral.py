"""Benchmark of lowpass_spectrum and spectral_token against plain PyTorch.

    python bench/bench_spectral.py                      # CPU: B=64, C=3, 224x224, size=16
    python bench/bench_spectral.py --device cuda --batch 256

Implementations, each given the same x (B, C, H, W) and (for the token) parameters,
timed from those to the (B, C, K, K) log-magnitude window / the (B, d) tokens:
  naive fft2                      the op's reference, eager: full fft2, fftshift, abs, crop
  matrix-DFT                      the strongest plain PyTorch, eager: the window alone as
                                  A_H x A_W^T with bases precomputed outside the timed
                                  region, in real arithmetic (x @ [cos | -sin] over W,
                                  then over H) and the mirror |X(-u,-v)| = |X(u,v)|
                                  of a real image (half the window's columns computed)
  matrix-DFT compiled             the same under torch.compile (compiled before timing)
  omnifm ext / omnifm triton      the fused op (CPU / CUDA)
The token adds the same PyTorch head (FreqMix, two GELU layers, pooling, L2) to the
plain-PyTorch spectra. Every answer is checked against the float64 reference before
any timing; an implementation that raises or answers wrong gets no time and the
script exits 1. The table gives ms, GB/s of x read and one ratio per baseline.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Failures, add_output_args, append_csv, check_answer, copy_bandwidth_gbps,  # noqa: E402
                     csv_path, forced_backend, print_table, time_ms)

from omnifm.nn import SpectralTokenizer  # noqa: E402
from omnifm.ops import lowpass_spectrum, lowpass_spectrum_ref, spectral_token, spectral_token_ref  # noqa: E402
from omnifm.ops._dft import complex_basis  # noqa: E402
from omnifm.ops.info import OPS  # noqa: E402
from omnifm.ops.spectral_token import token_head  # noqa: E402

NAIVE = "naive fft2"
MATRIX = "matrix-DFT"
COMPILED = "matrix-DFT compiled"
BASELINES = (NAIVE, MATRIX, COMPILED)
# Relative error vs the float64 reference: a few units of the output's precision
# (half images are rounded before the reference sees them, so only the compute counts).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def half_window_bases(H, W, size, device):
    """Real bases of the rows u in [-K//2, K//2] (2R, H) and the columns v in [0, K//2]
    (W, 2V) of the window, [cos; -sin] / N stacked: the rest is the mirror image."""
    half = size // 2
    rows = complex_basis(H, 2 * half + 1, torch.float32, device)  # frequencies -half..half
    cols = complex_basis(W, 2 * half + 1, torch.float32, device)[half:]  # 0..half
    return torch.cat([rows.real, rows.imag]).contiguous(), torch.cat([cols.real, cols.imag]).T.contiguous()


def matrix_dft_spectrum(x, rows, cols, size):
    """log1p |window of the DFT| of x (B, C, H, W) -> (B, C, K, K), in plain torch ops."""
    B, C, H, W = x.shape
    r, v = rows.shape[0] // 2, cols.shape[1] // 2
    z = rows @ (x.float().reshape(B * C * H, W) @ cols).view(B * C, H, 2 * v)  # (BC, 2R, 2V)
    re = z[:, :r, :v] - z[:, r:, v:]
    im = z[:, :r, v:] + z[:, r:, :v]
    mag = torch.sqrt(re * re + im * im)  # rows u = -half..half, columns v = 0..half
    half = size // 2
    right = mag[:, :size, :size - half]  # window columns v >= 0
    left = mag[:, 2 * half - size + 1:, 1:half + 1].flip(1, 2)  # v < 0: |X(-u, -v)|
    return torch.log1p(torch.cat([left, right], 2)).view(B, C, size, size)


def fused_backend(op, device, dtype):
    """(the fast backend for this device, None or why it cannot take this call);
    dtype is the one the op's backend checks take (see omnifm.ops.info.OPS)."""
    name = "triton" if device.type == "cuda" else "ext"
    return name, OPS[op](device.type, dtype)[name]()


def bench_op(op, impls, ref, rtol, args, device, nbytes, failures):
    """impls: {name: fn() -> output}. Check each against ref, then time it."""
    rows = []
    for name, fn in impls.items():
        try:
            check_answer(f"{op} {name}", fn(), ref, rtol)
        except Exception as exc:  # a wrong answer or a crash: no time for it
            failures.add(f"{op} {name}", exc)
            continue
        ms = time_ms(fn, device, args.warmup, args.repeat)
        rows.append({"impl": name, "ms": ms, "gbps": nbytes / ms / 1e6})
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
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of x (parameters stay float32)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the baseline")
    add_output_args(p)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    B = args.batch or (256 if device.type == "cuda" else 64)
    dtype, K = getattr(torch, args.dtype), args.size
    torch.manual_seed(0)
    x = torch.rand(B, args.channels, args.height, args.width, device=device).to(dtype)
    tok = SpectralTokenizer(args.channels, K, args.mix_dim, args.hidden_dim, args.dim).to(device)
    params = [t.detach() for t in (tok.mix_weight, tok.freq_embed, tok.w1, tok.b1, tok.w2, tok.b2)]
    rows_b, cols_b = half_window_bases(args.height, args.width, K, device)
    nbytes = x.numel() * x.element_size()
    shape = (f"B={B} C={args.channels} {args.height}x{args.width} size={K} m={args.mix_dim} "
             f"h={args.hidden_dim} d={args.dim} {args.dtype}")
    print(f"device: {device}  shape: {shape}  threads: {torch.get_num_threads()}")

    def spectrum():
        return matrix_dft_spectrum(x, rows_b, cols_b, K)

    def token():
        return token_head(spectrum(), *params)

    # op: (naive, matrix-DFT, fused, dtype its backend checks take: x's / the compute dtype)
    plain = {
        "lowpass_spectrum": (lambda: lowpass_spectrum_ref(x, K, log=True), spectrum,
                             lambda: lowpass_spectrum(x, K, log=True), dtype),
        "spectral_token": (lambda: spectral_token_ref(x, *params, size=K), token,
                           lambda: spectral_token(x, *params, size=K), torch.float32),
    }
    refs = {"lowpass_spectrum": lambda: lowpass_spectrum_ref(x.double(), K, log=True),
            "spectral_token": lambda: spectral_token_ref(x.double(), *[t.double() for t in params], size=K)}
    failures = Failures()
    all_rows = []
    with torch.no_grad():
        for op, (naive, matrix, fused, check_dtype) in plain.items():
            impls = {NAIVE: naive, MATRIX: matrix}
            if args.compile:
                impls[COMPILED] = torch.compile(matrix)
            name, reason = fused_backend(op, device, check_dtype)
            if reason is None:
                def run(fused=fused, name=name):
                    with forced_backend(name):
                        return fused()
                impls[f"omnifm {name}"] = run
            else:
                print(f"[skip] {op} {name}: {reason}")
            rows = bench_op(op, impls, refs[op](), RTOL[dtype], args, device, nbytes, failures)
            if device.type == "cuda":
                bw = copy_bandwidth_gbps(nbytes, device)
                for r in rows:
                    r["note"] = f"{100 * r['gbps'] / bw:.0f}% of copy bw ({bw:.0f} GB/s)"
            print_table(f"{op} ({shape}) on {device}", rows, BASELINES)
            all_rows += [{**r, "impl": f"{op} {r['impl']}"} for r in rows]
    if args.csv and all_rows:
        append_csv("spectral", device, shape, all_rows, path=csv_path(args))
    failures.exit_if_any()
    return all_rows


if __name__ == "__main__":
    main()
