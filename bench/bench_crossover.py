"""Where the compiled CPU kernels start to beat the PyTorch reference backend.

    python bench/bench_crossover.py                       # spectral_token: CPU_EXT_MIN_ELEMENTS, _MAX_HEAD_WORK
    python bench/bench_crossover.py --op eca_attention    # eca_attention: CPU_EXT_MIN_WIDTH
    python bench/bench_crossover.py --op cosine_topk      # cosine_topk: SCREEN_MIN_ROWS

For x of shape (B, C, H, W) over a grid of sizes, and token widths d (--dims; K=8,
m=16, h=64: the adapter's settings), times the op forced to ext and forced to the
reference, forward-only (no gradient recorded: prototypes, evaluation) and
forward+backward of the parameters (local training; x never needs a gradient there).
Both answers and gradients are checked against each other before timing. Prints ms
and reference/ext (> 1: ext is faster) and, per mode, the thresholds the measurements
support for the dispatcher's rule (ext from CPU_EXT_MIN_ELEMENTS elements of x, or
below that where the per-bin head has at most CPU_EXT_MAX_HEAD_WORK multiply-adds),
to compare with omnifm.ops.spectral_token.

eca_attention: r (B, L, d) attends to k=2 prototypes (d = dh), forward+backward of r and
the projections (the adapter's training step; forward-only calls always run the
reference core on CPU), for d in 16, 64, 256; compare with CPU_EXT_MIN_WIDTH.

cosine_topk: the compiled kernel's two exact paths, the float32 GEMM and the bfloat16
screen (the bank prepared inside each call, as the dispatcher does without prepared=),
for B queries of d=128 against M rows, k=8; both answers must be equal bit for bit;
compare with SCREEN_MIN_QUERIES and SCREEN_MIN_ROWS.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Failures, add_output_args, append_csv, check_answer, csv_path, forced_backend,  # noqa: E402
                     time_ms)

from omnifm.nn import ECAFusion, SpectralTokenizer  # noqa: E402
from omnifm.ops import cosine_topk as cosine_topk_op  # noqa: E402
from omnifm.ops.cosine_topk import cpu_has_fast_bfloat16, prepare_bank  # noqa: E402
from omnifm.ops.eca_attention import CPU_EXT_MIN_WIDTH  # noqa: E402
from omnifm.ops.spectral_token import CPU_EXT_MAX_HEAD_WORK, CPU_EXT_MIN_ELEMENTS, head_work  # noqa: E402

SHAPES = [(b, c, hw) for c in (1, 3) for hw in (28, 64, 128, 224) for b in (1, 8, 16, 32, 128)
          if b * c * hw * hw <= 32 * 3 * 224 * 224]


CPU = torch.device("cpu")


def ext_against_reference(label, call, failures, args):
    """call() -> (output, gradients or None), run forced to ext and to the reference:
    answers (and gradients) checked against each other, then both timed (a CSV row each
    unless --no-csv). Returns {backend: ms}, or None after recording a wrong answer."""
    answers = {}
    for name in ("reference", "ext"):
        with forced_backend(name):
            answers[name] = call()
    try:
        check_answer("ext", answers["ext"][0], answers["reference"][0], 1e-5)
        if answers["reference"][1] is not None:
            check_answer("ext gradients", answers["ext"][1], answers["reference"][1], 1e-4)
    except Exception as exc:  # noqa: BLE001
        failures.add(label, exc)
        return None
    ms = {}
    for name in ("ext", "reference"):
        with forced_backend(name):
            ms[name] = time_ms(call, CPU, warmup=args.warmup, repeat=args.repeat)
    if args.csv:
        append_csv(f"crossover {args.op}", CPU, label.removeprefix("ext "),
                   [{"impl": name, "ms": ms[name], "speedup": ms["reference"] / ms[name]} for name in ms],
                   path=csv_path(args))
    return ms


def token_call(tok, x, train, probe):
    def call():
        if not train:
            with torch.no_grad():
                return tok(x), None
        tok.zero_grad(set_to_none=True)
        out = tok(x)
        (out * probe).sum().backward()  # a random direction (|token| = 1 has no gradient)
        return out.detach(), torch.cat([p.grad.flatten() for p in tok.parameters()])
    return call


def token_sweep(args, failures):
    rows = []  # (train, numel, head work, ext faster)
    print(f"{'d':>4} {'B':>4} {'C':>2} {'HxW':>8} {'elements':>9} {'head MACs':>10} | {'fwd ext':>8} {'ref':>8} "
          f"{'ratio':>6} | {'train ext':>9} {'ref':>8} {'ratio':>6}")
    for d in [int(v) for v in args.dims.split(",")]:
        for B, C, hw in SHAPES[:2] if args.quick else SHAPES:
            g = torch.Generator().manual_seed(B * 1000 + C * 100 + hw + d)
            tok = SpectralTokenizer(C, 8, 16, 64, d)
            work = head_work(B, 8, 16, 64, d)
            x = torch.randn(B, C, hw, hw, generator=g)
            probe = torch.randn(B, d, generator=g)
            cells = []
            for train in (False, True):
                ms = ext_against_reference(f"ext d={d} B={B} C={C} {hw}x{hw} {'training' if train else 'forward'}",
                                           token_call(tok, x, train, probe), failures, args)
                if ms is None:
                    continue
                rows.append((train, x.numel(), work, ms["reference"] > ms["ext"]))
                cells.append(f"{ms['ext']:8.2f} {ms['reference']:8.2f} {ms['reference'] / ms['ext']:6.2f}")
            print(f"{d:>4} {B:>4} {C:>2} {f'{hw}x{hw}':>8} {x.numel():>9} {work:>10} | " + " | ".join(cells),
                  flush=True)
    # The dispatcher's rule: ext when x has at least MIN_ELEMENTS elements (the window
    # DFT beats the full FFT) or the head at most MAX_HEAD_WORK multiply-adds (the fused
    # loops beat ATen's calls). Report, per mode, the thresholds the measurements support.
    for train, name in ((False, "forward-only"), (True, "training")):
        mode = [r for r in rows if r[0] == train]
        losing = [r for r in mode if not r[3]]
        floor = min((r[1] for r in mode if all(q[1] < r[1] for q in losing)), default=None)
        ceiling = max((r[2] for r in mode if all(q[2] > r[2] for q in losing if q[1] < (floor or float("inf")))),
                      default=None)
        print(f"{name}: ext wins at every measured size from {floor} elements, and below that wherever the head "
              f"has at most {ceiling} multiply-adds (dispatcher: {CPU_EXT_MIN_ELEMENTS[train]} elements, "
              f"{CPU_EXT_MAX_HEAD_WORK[train]} multiply-adds)")


def eca_sweep(args, failures):
    print(f"{'d':>4} {'B':>3} {'L':>5} | {'train ext':>9} {'ref':>8} {'ratio':>6}")
    wins = {}
    for d in (16,) if args.quick else (16, 64, 256):
        for B, L in ((8, 16),) if args.quick else ((8, 16), (8, 256), (8, 1024), (32, 1024), (8, 4096), (32, 3136)):
            g = torch.Generator().manual_seed(d * 7 + B * L)
            eca = ECAFusion(d, d)
            r = torch.randn(B, L, d, generator=g).requires_grad_()
            protos, probe = torch.randn(B, 2, d, generator=g), torch.randn(B, L, d, generator=g)

            def step():
                eca.zero_grad(set_to_none=True)
                r.grad = None
                out = eca(r, protos)
                out.backward(probe)
                return out.detach(), torch.cat([r.grad.flatten()] + [p.grad.flatten() for p in eca.parameters()])

            ms = ext_against_reference(f"ext d={d} B={B} L={L}", step, failures, args)
            if ms is None:
                continue
            ratio = ms["reference"] / ms["ext"]
            wins.setdefault(d, []).append(ratio)
            print(f"{d:>4} {B:>3} {L:>5} | {ms['ext']:9.2f} {ms['reference']:8.2f} {ratio:6.2f}", flush=True)
    for d, ratios in wins.items():
        print(f"d={d}: reference/ext {min(ratios):.2f}-{max(ratios):.2f} "
              f"(dispatcher: ext from d >= {CPU_EXT_MIN_WIDTH})")


def topk_sweep(args, failures):
    topk_module = sys.modules["omnifm.ops.cosine_topk"]  # the module (omnifm.ops.cosine_topk is the function)
    if not cpu_has_fast_bfloat16():
        print("this CPU has no bfloat16 instructions: the dispatcher never screens here")
    print(f"{'B':>5} {'M':>7} | {'fp32 ms':>8} {'screen':>8} {'prepared':>8} | {'ratios':>11}")
    wins = {"screen": [], "prepared": []}
    d, k = 128, 8
    sizes = ((16, 4096),) if args.quick else [(b, m) for b in (16, 64, 256, 1024) for m in (4096, 16384, 65536, 200_000)]
    saved = dict(topk_module.SCREEN_MIN_QUERIES), dict(topk_module.SCREEN_MIN_ROWS)
    for B, M in sizes:
        g = torch.Generator().manual_seed(B + M)
        q, bank = torch.randn(B, d, generator=g), torch.randn(M, d, generator=g)
        prepared = prepare_bank(bank)
        never, always = {False: 1 << 62, True: 1 << 62}, {False: 0, True: 0}
        calls = {"fp32": (never, None), "screen": (always, None), "prepared": (always, prepared)}
        ms, answers = {}, {}
        try:
            with forced_backend("ext"):
                for name, (floors, prep) in calls.items():
                    topk_module.SCREEN_MIN_QUERIES, topk_module.SCREEN_MIN_ROWS = floors, floors
                    answers[name] = cosine_topk_op(q, bank, k, prepared=prep)
                    ms[name] = time_ms(lambda: cosine_topk_op(q, bank, k, prepared=prep), CPU,
                                       warmup=args.warmup, repeat=args.repeat)
        finally:
            topk_module.SCREEN_MIN_QUERIES, topk_module.SCREEN_MIN_ROWS = saved
        if not all(torch.equal(a, b) for name in ("screen", "prepared") for a, b in zip(answers["fp32"], answers[name])):
            failures.add(f"screen B={B} M={M}", AssertionError("the screen's answer differs from the float32 kernel's"))
            continue
        for name in wins:
            wins[name].append((B, M, ms["fp32"] > ms[name]))
        print(f"{B:>5} {M:>7} | {ms['fp32']:8.2f} {ms['screen']:8.2f} {ms['prepared']:8.2f} | "
              f"{ms['fp32'] / ms['screen']:5.2f} {ms['fp32'] / ms['prepared']:5.2f}", flush=True)
        if args.csv:
            append_csv("crossover cosine_topk", CPU, f"B={B} M={M} d={d} k={k}",
                       [{"impl": n, "ms": ms[n], "speedup": ms["fp32"] / ms[n]} for n in ms], path=csv_path(args))
    for name, rows in wins.items():
        print(f"{name}: faster than the float32 kernel at (B, M) = {[(b, m) for b, m, w in rows if w]}")
    q_min, m_min = topk_module.SCREEN_MIN_QUERIES, topk_module.SCREEN_MIN_ROWS
    print(f"dispatcher: screens from B >= {q_min[False]} and M >= {m_min[False]} per call; "
          f"with prepared=, from B >= {q_min[True]} and M >= {m_min[True]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=("spectral_token", "eca_attention", "cosine_topk"), default="spectral_token")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="two sizes only (a smoke test)")
    p.add_argument("--dims", default="16,64,256", help="spectral_token: token widths d to sweep")
    add_output_args(p)
    args = p.parse_args(argv)
    failures = Failures()
    {"eca_attention": eca_sweep, "cosine_topk": topk_sweep, "spectral_token": token_sweep}[args.op](args, failures)
    failures.exit_if_any()


if __name__ == "__main__":
    main()
