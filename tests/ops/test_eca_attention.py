import ast
import importlib
import math
import pathlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.ops import (eca_attention, eca_attention_ref, eca_psp, eca_psp_ref, eca_residual, eca_residual_ref,
                        spalign_loss)
from omnifm.ops import _backend
from tests.helpers import FLOOR, fast_backends, forced, relerr

BACKENDS = fast_backends("eca_core")
NAMES = ("r", "protos", "wq", "wk", "wv")


def make_inputs(B, L, d, dh, k, seed=0, dtype=torch.float64, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(device, dtype)
    return [r(B, L, d), r(B, k, d), r(d, dh, sc=scale * d ** -0.5), r(d, dh, sc=scale * d ** -0.5), r(d, dh, sc=d ** -0.5)]


def oracle(r, protos, wq, wk, wv, value_bias=None):
    """Independent float64 oracle: explicit per-token loops over the k keys."""
    r, protos, wq, wk, wv = (t.detach().double().cpu() for t in (r, protos, wq, wk, wv))
    keys, vals = protos @ wk, protos @ wv  # (B, k, dh)
    if value_bias is not None:
        vals = vals + value_bias.detach().double().cpu()
    out = torch.empty(r.shape[0], r.shape[1], wv.shape[1], dtype=torch.float64)
    for b in range(r.shape[0]):
        q = r[b] @ wq  # (L, dh)
        logits = torch.stack([(q * keys[b, j]).sum(1) for j in range(keys.shape[1])], 1) / math.sqrt(wq.shape[1])
        w = torch.exp(logits - logits.max(1, keepdim=True).values)
        w = w / w.sum(1, keepdim=True)
        out[b] = sum(w[:, j:j + 1] * vals[b, j] for j in range(keys.shape[1]))
    return out


@st.composite
def eca_cases(draw, max_l=70):
    return dict(B=draw(st.integers(1, 3)), L=draw(st.integers(1, max_l)), d=draw(st.integers(1, 48)),
                dh=draw(st.integers(1, 40)), k=draw(st.integers(1, 9)), seed=draw(st.integers(0, 2**31 - 1)),
                scale=draw(st.sampled_from([0.1, 1.0, 4.0])))


@given(eca_cases())
@settings(max_examples=40)
def test_reference_matches_oracle(case):
    inputs = make_inputs(**case)
    assert relerr(eca_attention_ref(*inputs), oracle(*inputs)) < 1e-12


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=eca_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=25)
def test_fast_matches_reference(backend, device, case, dtype):
    if backend == "triton":
        dtype = torch.float32
    inputs64 = make_inputs(**case, device=device)
    inputs = [t.to(dtype) for t in inputs64]
    with forced(backend):
        out = eca_attention(*inputs)
    assert out.dtype == dtype and out.shape == (case["B"], case["L"], case["dh"])
    ref64 = eca_attention_ref(*inputs64)
    bound = 3 * relerr(eca_attention_ref(*inputs), ref64) + FLOOR[dtype] * 10
    assert relerr(out, ref64) <= bound


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=eca_cases(max_l=40))
@settings(max_examples=12)
def test_fast_backward_matches_reference(backend, device, case):
    dtype = torch.float64 if backend == "ext" else torch.float32
    base = make_inputs(**case, device=device)
    fast = [t.to(dtype).clone().requires_grad_() for t in base]
    ref = [t.clone().requires_grad_() for t in base]
    with forced(backend):
        out = eca_attention(*fast)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"] + 1)).to(device)
    out.backward(g.to(dtype))
    eca_attention_ref(*ref).backward(g)
    assert_grads_match(NAMES, fast, ref, g, 1e-9 if dtype == torch.float64 else 1e-4)


def assert_grads_match(names, fast, ref, g, bound):
    """Each fast gradient within bound (relative) of the reference's; where the
    reference's is zero up to roundoff (e.g. k=1: softmax of one key is constant), the
    fast one must be too."""
    for name, a, b in zip(names, fast, ref):
        if b.grad.norm() > 1e-8 * g.norm():
            assert relerr(a.grad, b.grad) < bound, name
        else:
            assert a.grad.double().norm() < 1e-5 * g.norm(), name


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), *BACKENDS])
@given(case=eca_cases(max_l=40))
@settings(max_examples=10)
def test_value_bias_forward_and_backward(backend, device, case):
    """value_bias b: Z = softmax(.) (protos Wv + b), against the loop oracle; its
    gradient (the column sums of the output gradient, as the weights sum to 1) and the
    others against the reference."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    base = make_inputs(**case, device=device)
    bias = torch.randn(case["dh"], dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"] + 2))
    bias = bias.to(device)
    fast = [t.to(dtype).clone().requires_grad_() for t in (*base, bias)]
    ref = [t.clone().requires_grad_() for t in (*base, bias)]
    with forced(backend):
        out = eca_attention(*fast[:5], value_bias=fast[5])
    want = oracle(*base, value_bias=bias)
    assert relerr(out, want) < (1e-4 if dtype == torch.float32 else 1e-10)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"] + 3)).to(device)
    out.backward(g.to(dtype))
    eca_attention_ref(*ref[:5], value_bias=ref[5]).backward(g)
    torch.testing.assert_close(ref[5].grad, g.sum((0, 1)))
    assert_grads_match((*NAMES, "value_bias"), fast, ref, g, 1e-9 if dtype == torch.float64 else 1e-4)


def test_gradcheck_reference():
    inputs = [t.requires_grad_() for t in make_inputs(2, 5, 4, 3, 3)]
    assert torch.autograd.gradcheck(eca_attention_ref, inputs)


def test_gradcheck_ext():
    if "ext" not in dict(BACKENDS):
        pytest.skip("ext not available here")
    inputs = [t.requires_grad_() for t in make_inputs(2, 7, 5, 4, 3, seed=1)]
    with forced("ext"):
        assert torch.autograd.gradcheck(eca_attention, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_gpu(dtype):
    inputs = make_inputs(4, 3136, 256, 256, 2, dtype=torch.float32, device="cuda")
    low = [t.to(dtype) for t in inputs]
    with forced("triton"):
        out = eca_attention(*low)
    ref64 = eca_attention_ref(*[t.double() for t in inputs])
    assert relerr(out, ref64) <= 2 * relerr(eca_attention_ref(*low), ref64) + 1e-3


@pytest.mark.parametrize("qualname", ["omnifm::eca_core", "omnifm::eca_core_triton"])
def test_opcheck(qualname):
    backend = "triton" if qualname.endswith("triton") else "ext"
    if backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    device = dict(BACKENDS)[backend]
    g = torch.Generator().manual_seed(0)
    r, at, vp = (torch.randn(*s, generator=g).to(device).requires_grad_() for s in ((2, 19, 12), (2, 3, 12), (2, 3, 8)))
    torch.library.opcheck(getattr(torch.ops.omnifm, qualname.split("::")[1]), (r, at, vp))
    backward = getattr(torch.ops.omnifm, qualname.split("::")[1].replace("eca_core", "eca_core_backward"))
    grad = torch.randn(2, 19, 8, generator=g).to(device)
    torch.library.opcheck(backward, (grad, r.detach(), at.detach(), vp.detach()))


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
def test_torch_compile_fullgraph(backend):
    if backend != "reference" and backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    inputs = [t.float().requires_grad_() for t in make_inputs(2, 9, 8, 6, 2)]
    with forced(backend):
        eager = eca_attention(*inputs)
        out = torch.compile(eca_attention, fullgraph=True, backend="aot_eager")(*inputs)
        out.sum().backward()
    assert relerr(out, eager) < 1e-6
    assert all(t.grad is not None for t in inputs)


@pytest.mark.parametrize("backend", ["reference", "ext"])
def test_spalign_loss_matches_definition(backend):
    if backend == "ext" and _backend.ext_status("spalign_loss", "cpu") is not None:
        pytest.skip("ext not available here")
    g = torch.Generator().manual_seed(0)
    s, protos = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    want = sum(((s[b] - protos[b].mean(0)) ** 2).sum() for b in range(5)) / 5
    with forced(backend):
        assert abs(spalign_loss(s, protos).item() - want.item()) < 1e-12
        s.requires_grad_()
        protos.requires_grad_()
        assert torch.autograd.gradcheck(spalign_loss, (s, protos))
        mixed = spalign_loss(s.detach().float(), protos.detach())  # float32 tokens, float64 prototypes: promoted
    assert mixed.dtype == torch.float64 and abs(mixed.item() - want.item()) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
def test_errors_name_the_argument(backend):
    if backend != "reference" and backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    r, protos, wq, wk, wv = make_inputs(2, 5, 8, 6, 3, dtype=torch.float32)
    cases = [
        (lambda: eca_attention(r[0], protos, wq, wk, wv), ValueError, "r"),
        (lambda: eca_attention(r.long(), protos, wq, wk, wv), TypeError, "r"),
        (lambda: eca_attention(r, protos[:1], wq, wk, wv), ValueError, "protos"),
        (lambda: eca_attention(r, protos[:, :0], wq, wk, wv), ValueError, "protos"),
        (lambda: eca_attention(r, protos[..., :4], wq, wk, wv), ValueError, "protos"),
        (lambda: eca_attention(r, protos, wq[:4], wk, wv), ValueError, "wq"),
        (lambda: eca_attention(r, protos, wq, wk[:, :5], wv), ValueError, "wk"),
        (lambda: eca_attention(r, protos, wq, wk, wv.T), ValueError, "wv"),
        (lambda: eca_attention(r, protos, wq, wk, wv.double()), TypeError, "wv"),
        (lambda: eca_attention(r, protos, wq, wk.to("meta"), wv), ValueError, "wk"),
        (lambda: eca_attention(r, protos, wq, wk, wv, value_bias=wv[0, :5]), ValueError, "value_bias"),
        (lambda: eca_attention(r, protos, wq, wk, wv, value_bias=wv[0].double()), TypeError, "value_bias"),
        (lambda: eca_attention(r, protos, wq, wk, wv, value_bias=[0.0] * 6), TypeError, "value_bias"),
        (lambda: spalign_loss(r[:, 0], protos[:1]), ValueError, "protos"),
        (lambda: spalign_loss(r[:0, 0], protos[:0]), ValueError, "s"),
        (lambda: spalign_loss(r, protos), ValueError, "s"),
    ]
    with forced(backend):
        for fn, exc, name in cases:
            with pytest.raises(exc, match=rf"^{name}:"):
                fn()


# --- Shapes crossing every tile and chunk. The C++ kernel parallelises over chunks of
# 256 token rows (kChunkRows) and sums d(at), d(vp) per chunk; the Triton kernel tiles
# rows (BL), features of r (BD) and of Z (BDH), which tests shrink to 16, and sums
# d(at), d(vp) per row block. Each drawn size spans 2-3 whole tiles plus a ragged part.

EXT_CHUNK = 256
SMALL = 16  # the smallest tile tl.dot accepts; also the padded size of k <= 16
TRITON_SOURCE = pathlib.Path(eca_attention_ref.__code__.co_filename).parent / "triton" / "eca_attention.py"


def small_tiles():
    """Shrink the Triton tiles to 16 so small shapes cross every one of them."""
    from omnifm.ops.triton import eca_attention as kernel

    return mock.patch.multiple(kernel, BL=SMALL, BD_MAX=SMALL, BDH_MAX=SMALL)


def past(tile):
    """A size spanning 2 or 3 whole tiles plus a ragged part (1..tile-1 more)."""
    return st.integers(2, 3).flatmap(lambda n: st.integers(n * tile + 1, (n + 1) * tile - 1))


@st.composite
def crossing_cases(draw, backend):
    """B > 1; L past 2 chunks/row blocks; for Triton d and dh past 2 feature tiles; k up
    to the padded limit 16 and past it."""
    if backend == "ext":
        L, d, dh = draw(past(EXT_CHUNK)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    else:
        L, d, dh = draw(past(SMALL)), draw(past(SMALL)), draw(past(SMALL))
    return dict(B=draw(st.integers(2, 3)), L=L, d=d, dh=dh, k=draw(st.sampled_from([1, 2, 3, 7, 15, 16, 17])),
                seed=draw(st.integers(0, 2**31 - 1)), scale=draw(st.sampled_from([0.1, 1.0, 4.0])))


def check_forward_backward(backend, device, case, dtype):
    """Output and the gradients of all five inputs against the float64 reference, each
    within 3x the error of the reference run in dtype plus a floor."""
    base = make_inputs(**case, device=device)
    g = torch.randn(case["B"], case["L"], case["dh"], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(case["seed"] + 1)).to(device)
    runs = {}
    for name, tensors, fn in (("fast", [t.to(dtype) for t in base], eca_attention),
                              ("ref", [t.to(dtype) for t in base], eca_attention_ref),
                              ("ref64", base, eca_attention_ref)):
        tensors = [t.clone().requires_grad_() for t in tensors]
        with forced(backend if name == "fast" else "reference"):
            out = fn(*tensors)
        out.backward(g.to(dtype))
        runs[name] = [out] + [t.grad for t in tensors]
    for what, fast, ref, ref64 in zip(("Z",) + NAMES, runs["fast"], runs["ref"], runs["ref64"]):
        assert fast.dtype == dtype and fast.shape == ref64.shape, what
        if ref64.norm() > 1e-8 * g.norm():
            bound = 3 * relerr(ref, ref64) + 10 * FLOOR[dtype]
            err = relerr(fast, ref64)
            assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"
        else:  # zero up to roundoff: k=1 (softmax of one key is constant)
            assert fast.double().norm() <= 10 * ref.double().norm() + 1e-5 * g.norm(), what


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b[0] == "ext"])
@given(case=crossing_cases("ext"), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=12)
def test_ext_crossing_chunks(backend, device, case, dtype):
    check_forward_backward(backend, device, case, dtype)


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b[0] == "triton"])
@given(case=crossing_cases("triton"))
@settings(max_examples=10)
def test_triton_crossing_small_tiles(backend, device, case):
    with small_tiles():
        check_forward_backward(backend, device, case, torch.float32)


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b[0] == "triton"])
def test_triton_crossing_default_tiles(backend, device):
    from omnifm.ops.triton import eca_attention as kernel

    L, d, dh = 2 * kernel.BL + 37, 2 * kernel.BD_MAX + 44, 2 * kernel.BDH_MAX + 4
    check_forward_backward(backend, device, dict(B=2, L=L, d=d, dh=dh, k=5, seed=3), torch.float32)


@given(case=eca_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=15)
def test_reference_backend_matches_reference(case, dtype):
    """The reference backend (what CPU runs by default) computes the rank-k core in
    PyTorch, not eca_attention_ref itself: check it like a fast path."""
    check_forward_backward("reference", "cpu", case, dtype)


def test_cpu_auto_dispatch():
    """On CPU, auto runs forward-only calls on the reference backend's rank-k core (and
    backend_info says why); calls that record gradients on ext from the measured token
    width CPU_EXT_MIN_WIDTH, below it on the reference."""
    from omnifm.ops import backend_info

    module = importlib.import_module("omnifm.ops.eca_attention")  # the package exports the function by that name
    choice = backend_info()["ops"]["eca_attention"]["cpu"]
    assert choice["backend"] == "reference"
    wide = module.CPU_EXT_MIN_WIDTH
    with mock.patch.object(module, "eca_core_ref", wraps=module.eca_core_ref) as core_ref:
        inputs = [t.float().requires_grad_() for t in make_inputs(2, 9, wide, 6, 3)]
        with torch.no_grad():
            eca_attention(*inputs)
        assert core_ref.call_count == 1
        if "ext" in dict(BACKENDS):
            assert "rank-k" in choice["skipped"]["ext"]
            eca_attention(*inputs)
            assert core_ref.call_count == 1
            narrow = [t.float().requires_grad_() for t in make_inputs(2, 9, wide - 1, 6, 3)]
            eca_attention(*narrow)
            assert core_ref.call_count == 2


def test_ext_backward_independent_of_threads():
    """The per-chunk partial sums are reduced in a fixed order: the core's gradients
    are bitwise the same with 1 and 2 threads. (2 * B*L*k*(d + dh) = 2.1M multiply-adds:
    over the floor under which the kernels run serially, kMinParallelWork in parallel.h.)"""
    if "ext" not in dict(BACKENDS):
        pytest.skip("ext not available here")
    g = torch.Generator().manual_seed(5)
    args = [torch.randn(*s, generator=g) for s in ((4, 3 * EXT_CHUNK + 5, 48), (4, 3 * EXT_CHUNK + 5, 64),
                                                    (4, 3, 64), (4, 3, 48))]
    grads, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(torch.ops.omnifm.eca_core_backward(*args))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_crossing_gpu(dtype):
    """A larger shape past the default tiles on every axis, forward and backward."""
    check_forward_backward("triton", "cuda", dict(B=3, L=1000, d=300, dh=200, k=5, seed=4), dtype)


def test_triton_dots_are_ieee():
    """Every tl.dot asks for IEEE float32: the interpreter computes IEEE whatever it is
    told, so only this check sees a GPU-only TF32 dot."""
    tree = ast.parse(TRITON_SOURCE.read_text())
    dots = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "dot"]
    assert dots
    for call in dots:
        precision = {kw.arg: kw.value for kw in call.keywords}.get("input_precision")
        assert isinstance(precision, ast.Constant) and precision.value == "ieee", f"line {call.lineno}"


# --- eca_residual: x + ECA(x^T)^T for channel-first tokens (the adapter's spatial mode).

RESIDUAL_NAMES = ("x", "protos", "wq", "wk", "wv", "value_bias")
HAS_RESIDUAL_EXT = ("ext", "cpu") in fast_backends("eca_residual")


def residual_inputs(B, L, d, dh, k, seed=0, dtype=torch.float64, scale=1.0, bias=True, **_):
    r, protos, wq, wk, _wv = make_inputs(B, L, d, dh, k, seed=seed, dtype=dtype, scale=scale)
    g = torch.Generator().manual_seed(seed + 11)
    wv = (torch.randn(d, d, generator=g, dtype=torch.float64) * d ** -0.5).to(dtype)
    b = (torch.randn(d, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    return [r.transpose(1, 2).contiguous(), protos, wq, wk, wv, b]


def residual_oracle(x, protos, wq, wk, wv, value_bias):
    return x.double() + oracle(x.transpose(1, 2), protos, wq, wk, wv, value_bias).transpose(1, 2)


@pytest.mark.parametrize("backend", ["reference", "ext"])
@given(case=eca_cases(), dtype=st.sampled_from([torch.float32, torch.float64]), bias=st.booleans())
@settings(max_examples=25)
def test_eca_residual_matches_oracle(backend, case, dtype, bias):
    """The dispatched op (ext: one compiled call) against the loop oracle, any L, d, k."""
    if backend == "ext" and not HAS_RESIDUAL_EXT:
        pytest.skip("ext not available here")
    inputs64 = residual_inputs(**case, bias=bias)
    inputs = [None if t is None else t.to(dtype) for t in inputs64]
    with forced(backend):
        out = eca_residual(*inputs[:5], value_bias=inputs[5])
    assert out.dtype == dtype and out.shape == inputs[0].shape
    want = residual_oracle(*inputs64)
    low = eca_residual_ref(*inputs[:5], value_bias=inputs[5])
    assert relerr(out, want) <= 3 * relerr(low, want) + FLOOR[dtype] * 10


@pytest.mark.parametrize("backend", ["reference", "ext"])
@given(case=eca_cases(max_l=40), bias=st.booleans())
@settings(max_examples=15)
def test_eca_residual_backward_matches_reference(backend, case, bias):
    """Gradients of x (the residual path plus the attention's), protos, wq, wk, wv and
    the bias against autograd through the float64 reference."""
    if backend == "ext" and not HAS_RESIDUAL_EXT:
        pytest.skip("ext not available here")
    base = residual_inputs(**case, bias=bias)
    leaves = lambda: [None if t is None else t.clone().requires_grad_() for t in base]
    fast, ref = leaves(), leaves()
    with forced(backend):
        out = eca_residual(*fast[:5], value_bias=fast[5])
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"] + 1))
    out.backward(g)
    eca_residual_ref(*ref[:5], value_bias=ref[5]).backward(g)
    given = [i for i, t in enumerate(base) if t is not None]
    assert_grads_match([RESIDUAL_NAMES[i] for i in given], [fast[i] for i in given], [ref[i] for i in given], g, 1e-9)


def test_eca_residual_gradcheck_ext():
    if not HAS_RESIDUAL_EXT:
        pytest.skip("ext not available here")
    inputs = [t.requires_grad_() for t in residual_inputs(2, 7, 5, 4, 3, seed=1)]
    with forced("ext"):
        assert torch.autograd.gradcheck(lambda *a: eca_residual(*a[:5], value_bias=a[5]), inputs)


def test_eca_residual_opcheck():
    if not HAS_RESIDUAL_EXT:
        pytest.skip("ext not available here")
    for bias in (True, False):
        x, protos, wq, wk, wv, b = residual_inputs(2, 19, 12, 8, 3, dtype=torch.float32, bias=bias)
        args = [t.requires_grad_() for t in (x, protos, wq, wk, wv)] + [None if b is None else b.requires_grad_()]
        torch.library.opcheck(torch.ops.omnifm.eca_residual, tuple(args))
        grad = torch.randn_like(x)
        torch.library.opcheck(torch.ops.omnifm.eca_residual_backward,
                              (grad, *(None if t is None else t.detach() for t in args)))


def test_eca_residual_dispatch_and_compile():
    """CPU with the extension: one compiled call (not the composition through
    eca_attention's dispatch); forcing the reference composes; torch.compile traces it."""
    module = importlib.import_module("omnifm.ops.eca_attention")
    inputs = [t.float().requires_grad_() for t in residual_inputs(2, 9, 8, 6, 2)]
    with mock.patch.object(module, "_dispatched", wraps=module._dispatched) as composed:
        eager = eca_residual(*inputs[:5], value_bias=inputs[5])
        assert composed.call_count == (0 if HAS_RESIDUAL_EXT else 1)
        with forced("reference"):
            eca_residual(*inputs[:5], value_bias=inputs[5])
        assert composed.call_count == (1 if HAS_RESIDUAL_EXT else 2)
    compiled = torch.compile(lambda *a: eca_residual(*a[:5], value_bias=a[5]), fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    out.sum().backward()
    assert relerr(out, eager) < 1e-6
    assert all(t.grad is not None for t in inputs)


def test_eca_residual_errors_name_the_argument():
    x, protos, wq, wk, wv, b = residual_inputs(2, 5, 6, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="wv"):
        eca_residual(x, protos, wq, wk, wv[:, :5], value_bias=b)
    with pytest.raises(ValueError, match="x"):
        eca_residual(x[0], protos, wq, wk, wv, value_bias=b)
    with pytest.raises(ValueError, match="protos"):
        eca_residual(x, protos[:1], wq, wk, wv, value_bias=b)
    with pytest.raises(ValueError, match="value_bias"):
        eca_residual(x, protos, wq, wk, wv, value_bias=b[:3])
    with pytest.raises(TypeError, match="dtype|float"):
        eca_residual(x.double(), protos, wq, wk, wv, value_bias=b)


# --- eca_psp: [ECA(r) out_weight^T | r | suffix] (the adapter's sequence mode with PSP).

PSP_NAMES = ("r", "protos", "wq", "wk", "wv", "out_weight", "suffix")
HAS_PSP_EXT = ("ext", "cpu") in fast_backends("eca_psp")


def psp_inputs(B, L, d, dh, k, seed=0, dtype=torch.float64, scale=1.0, prompts=3, **_):
    r, protos, wq, wk, wv = make_inputs(B, L, d, dh, k, seed=seed, dtype=dtype, scale=scale)
    g = torch.Generator().manual_seed(seed + 13)
    out_weight = (torch.randn(d, dh, generator=g, dtype=torch.float64) * dh ** -0.5).to(dtype)
    suffix = torch.randn(prompts, d, generator=g, dtype=torch.float64).to(dtype)
    return [r, protos, wq, wk, wv, out_weight, suffix]


def psp_oracle(r, protos, wq, wk, wv, out_weight, suffix):
    """The loop oracle's Z, mapped, then the concatenation, in float64."""
    z = oracle(r, protos, wq, wk, wv) @ out_weight.double().transpose(0, 1)
    return torch.cat([z, r.double(), suffix.double().expand(r.shape[0], -1, -1)], dim=1)


@pytest.mark.parametrize("backend", ["reference", "ext"])
@given(case=eca_cases(), dtype=st.sampled_from([torch.float32, torch.float64]), prompts=st.integers(0, 5))
@settings(max_examples=25)
def test_eca_psp_matches_oracle(backend, case, dtype, prompts):
    """The dispatched op (ext: one compiled call) against the loop oracle: prefix,
    tokens and prompts in their places, any L, d, k, p (p = 0 too)."""
    if backend == "ext" and not HAS_PSP_EXT:
        pytest.skip("ext not available here")
    inputs64 = psp_inputs(**case, prompts=prompts)
    inputs = [t.to(dtype) for t in inputs64]
    with forced(backend):
        out = eca_psp(*inputs)
    B, L, d = inputs[0].shape
    assert out.dtype == dtype and out.shape == (B, 2 * L + prompts, d) and out.is_contiguous()
    want = psp_oracle(*inputs64)
    low = eca_psp_ref(*inputs)
    assert relerr(out[:, :L], want[:, :L]) <= 3 * relerr(low[:, :L], want[:, :L]) + FLOOR[dtype] * 10
    assert torch.equal(out[:, L:], want[:, L:].to(dtype))  # the tokens and prompts are copies: exact


@pytest.mark.parametrize("backend", ["reference", "ext"])
@given(case=eca_cases(max_l=40), prompts=st.integers(0, 5))
@settings(max_examples=15)
def test_eca_psp_backward_matches_reference(backend, case, prompts):
    """Gradients of r (its two uses summed), protos, wq, wk, wv, out_weight and the
    prompts (summed over the batch) against autograd through the float64 reference."""
    if backend == "ext" and not HAS_PSP_EXT:
        pytest.skip("ext not available here")
    base = psp_inputs(**case, prompts=prompts)
    leaves = lambda: [t.clone().requires_grad_() for t in base]
    fast, ref = leaves(), leaves()
    with forced(backend):
        out = eca_psp(*fast)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"] + 1))
    out.backward(g)
    eca_psp_ref(*ref).backward(g)
    names = list(PSP_NAMES) if prompts else list(PSP_NAMES[:-1])  # no prompts: an empty gradient
    assert_grads_match(names, fast[:len(names)], ref[:len(names)], g, 1e-9)


def test_eca_psp_gradcheck_ext():
    if not HAS_PSP_EXT:
        pytest.skip("ext not available here")
    inputs = [t.requires_grad_() for t in psp_inputs(2, 7, 5, 4, 3, seed=1)]
    with forced("ext"):
        assert torch.autograd.gradcheck(lambda *a: eca_psp(*a), inputs)


def test_eca_psp_opcheck():
    if not HAS_PSP_EXT:
        pytest.skip("ext not available here")
    args = [t.requires_grad_() for t in psp_inputs(2, 19, 12, 8, 3, dtype=torch.float32)]
    torch.library.opcheck(torch.ops.omnifm.eca_psp, tuple(args))
    grad = torch.randn(2, 2 * 19 + 3, 12)
    torch.library.opcheck(torch.ops.omnifm.eca_psp_backward, (grad, *(t.detach() for t in args)))


def test_eca_psp_dispatch_and_compile():
    """CPU with the extension: one compiled call (not the composition through
    eca_attention's dispatch); forcing the reference composes; torch.compile traces it."""
    module = importlib.import_module("omnifm.ops.eca_attention")
    inputs = [t.float().requires_grad_() for t in psp_inputs(2, 9, 8, 6, 2)]
    with mock.patch.object(module, "_dispatched", wraps=module._dispatched) as composed:
        eager = eca_psp(*inputs)
        assert composed.call_count == (0 if HAS_PSP_EXT else 1)
        with forced("reference"):
            eca_psp(*inputs)
        assert composed.call_count == (1 if HAS_PSP_EXT else 2)
    compiled = torch.compile(lambda *a: eca_psp(*a), fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    out.sum().backward()
    assert relerr(out, eager) < 1e-6
    assert all(t.grad is not None for t in inputs)


def test_eca_psp_errors_name_the_argument():
    r, protos, wq, wk, wv, out_weight, suffix = psp_inputs(2, 5, 6, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="out_weight"):
        eca_psp(r, protos, wq, wk, wv, out_weight[:, :3], suffix)
    with pytest.raises(ValueError, match="suffix"):
        eca_psp(r, protos, wq, wk, wv, out_weight, suffix[:, :5])
    with pytest.raises(ValueError, match="protos"):
        eca_psp(r, protos[:1], wq, wk, wv, out_weight, suffix)
    with pytest.raises(TypeError, match="suffix"):
        eca_psp(r, protos, wq, wk, wv, out_weight, suffix.double())
