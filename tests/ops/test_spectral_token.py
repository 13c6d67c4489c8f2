import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.ops import spectral_token, spectral_token_ref
from omnifm.ops.spectral_token import kept_numel, token_head
from tests.helpers import assert_close_to_ref, fast_backends, forced, relerr
from tests.ops.test_lowpass_spectrum import CHUNKED_BATCHES, CROSS, TILE, crossing, numpy_oracle

BACKENDS = fast_backends("spectral_token")
NAMES = ("x", "mix_weight", "freq_embed", "w1", "b1", "w2", "b2")
FUSED_MAX_SIZE = 16  # omnifm.ops.triton.limits: larger windows take the lowpass kernel + PyTorch head


def make_inputs(B, C, H, W, size, m, h, d, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    x = (torch.rand(B, C, H, W, generator=g, dtype=torch.float64) + 0.1).to(device, dtype)
    return [x, r(m, C, scale=C ** -0.5), r(size * size, m, scale=0.1), r(h, m, scale=m ** -0.5),
            r(h, scale=0.1), r(d, h, scale=h ** -0.5), r(d, scale=0.1)]


@st.composite
def token_cases(draw, max_hw=24, max_size=None, batch=st.integers(1, 3), hw=None, min_size=1, d=st.integers(1, 80)):
    hw = st.integers(1, max_hw) if hw is None else hw
    H, W = draw(hw), draw(hw)
    top = min(H, W) if max_size is None else min(H, W, max_size)
    return dict(B=draw(batch), C=draw(st.integers(1, 3)), H=H, W=W,
                size=draw(st.integers(min(min_size, top), top)), m=draw(st.integers(1, 20)),
                h=draw(st.integers(1, 40)), d=draw(d), seed=draw(st.integers(0, 2**31 - 1)))


def crossing_cases(backend, large_window=False):
    """Shapes past the first tile/chunk: Triton H, W and d over 2 tiles with a ragged
    last one (fused windows, or large ones over 2 window blocks); C++ chunked batches."""
    if backend != "triton":
        return token_cases(batch=st.sampled_from(CHUNKED_BATCHES))
    if large_window:
        return token_cases(batch=st.integers(1, 2), hw=st.integers(*CROSS), min_size=FUSED_MAX_SIZE + 1)
    return token_cases(batch=st.integers(1, 2), hw=st.integers(*CROSS), max_size=FUSED_MAX_SIZE,
                       d=st.integers(*CROSS))


def oracle(x, mix_weight, freq_embed, w1, b1, w2, b2, size):
    """Independent float64 oracle: numpy FFT spectrum, then the head written out."""
    s = torch.log1p(numpy_oracle(x, size))  # (B, C, K, K)
    B, C = s.shape[:2]
    bins = s.reshape(B, C, size * size).permute(0, 2, 1)
    f = torch.einsum("bnc,mc->bnm", bins, mix_weight) + freq_embed
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))
    a2 = gelu(gelu(f @ w1.T + b1) @ w2.T + b2)
    p = a2.mean(1)
    return p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)


@given(token_cases(max_hw=40))
@settings(max_examples=30)
def test_reference_matches_oracle(case):
    size = case["size"]
    inputs = make_inputs(**case)
    assert relerr(spectral_token_ref(*inputs, size=size), oracle(*inputs, size)) < 1e-12


def check_forward(backend, case, dtype, device, x_dtype=None):
    """The fast token of case against the float64 reference; x may be stored in x_dtype."""
    size = case["size"]
    inputs64 = make_inputs(**case, device=device)
    inputs = [t.to(dtype) for t in inputs64]
    if x_dtype is not None:
        inputs[0] = inputs[0].to(x_dtype)
        inputs64[0] = inputs[0].double()  # the rounding of x is the caller's, not the kernel's
    out = spectral_token(*inputs, size=size)
    assert out.dtype == dtype and out.shape == (case["B"], case["d"])
    assert_close_to_ref(out, spectral_token_ref(*inputs64, size=size), spectral_token_ref(*inputs, size=size),
                        dtype, backend)
    assert torch.allclose(out.double().norm(dim=1), torch.ones(out.shape[0], dtype=torch.float64, device=device),
                          atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=token_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=20)
def test_fast_matches_reference(backend, device, case, dtype):
    if backend == "triton":
        dtype = torch.float32
    with forced(backend):
        check_forward(backend, case, dtype, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(data=st.data())
@settings(max_examples=12)
def test_fast_crosses_tiles_and_chunks(backend, device, data):
    """Triton: the fused kernel with H, W and d over 2 tiles (ragged), float16/bfloat16
    images too. C++: batches over several chunks with a ragged last one."""
    case = data.draw(crossing_cases(backend))
    dtype = torch.float32 if backend == "triton" else data.draw(st.sampled_from([torch.float32, torch.float64]))
    x_dtype = data.draw(st.sampled_from([None, torch.float16, torch.bfloat16])) if backend == "triton" else None
    with crossing(backend):
        check_forward(backend, case, dtype, device, x_dtype)


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b[0] == "triton"])
@given(case=crossing_cases("triton", large_window=True))
@settings(max_examples=6)
def test_triton_large_window_path(backend, device, case):
    """Windows past the fused limit go through the lowpass kernel (over 2 window
    blocks and 2 plane tiles here) + the PyTorch head."""
    with crossing("triton"):
        check_forward("triton", case, torch.float32, device)


@pytest.mark.parametrize("case", [dict(B=2, C=3, H=70, W=67, size=16, m=20, h=40, d=150),
                                  dict(B=1, C=2, H=97, W=90, size=70, m=8, h=24, d=40)])
def test_default_tiles_triton(case):
    """Default tiles: H, W span 3 plane tiles of 32 and d = 150 spans 3 d-blocks of 64,
    the last ones ragged (fused kernel); a window of 70 spans 2 window blocks of 64
    (large-window path)."""
    if "triton" not in dict(BACKENDS):
        pytest.skip("triton not available here")
    with forced("triton"):
        check_forward("triton", {**case, "seed": 5}, torch.float32, dict(BACKENDS)["triton"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_images_gpu(dtype):
    case = dict(B=16, C=3, H=224, W=224, size=16, m=32, h=64, d=128, seed=0)
    with forced("triton"):
        check_forward("triton", case, torch.float32, "cuda", x_dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [dict(B=5, C=3, H=224, W=200, size=16, m=32, h=64, d=150),
                                  dict(B=3, C=1, H=161, W=150, size=15, m=7, h=33, d=257),
                                  dict(B=2, C=2, H=300, W=257, size=131, m=8, h=16, d=20)])
def test_triton_default_tiles_gpu(case):
    """Default tiles on a GPU: > 2 plane tiles and d-blocks (ragged) in the fused kernel,
    3 window blocks (ragged) on the large-window path; forward and backward."""
    case = {**case, "seed": 1}
    with forced("triton"):
        check_forward("triton", case, torch.float32, "cuda")
        check_backward("triton", case, "cuda", seed=2)


def test_gradcheck_reference():
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 7, 6, 4, 3, 5, 4)]
    assert torch.autograd.gradcheck(lambda *a: spectral_token_ref(*a, size=4), inputs)


def test_gradcheck_ext():
    if "ext" not in dict(BACKENDS):
        pytest.skip("ext not available here")
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 9, 7, 5, 3, 6, 4, seed=3)]
    with forced("ext"):
        assert torch.autograd.gradcheck(lambda *a: spectral_token(*a, size=5), inputs)


def check_backward(backend, case, device, seed):
    """Gradients of every input (the analytic backward) against autograd through the
    float64 reference, for the forward of the currently forced backend."""
    dtype = torch.float64 if backend == "ext" else torch.float32
    size = case["size"]
    base = make_inputs(**case, device=device)
    fast = [t.to(dtype, copy=True).requires_grad_() for t in base]
    ref = [t.detach().clone().requires_grad_() for t in base]
    out = spectral_token(*fast, size=size)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    out.backward(g.to(dtype))
    spectral_token_ref(*ref, size=size).backward(g)
    bound = 1e-9 if dtype == torch.float64 else 1e-3
    for name, a, b in zip(NAMES, fast, ref):
        if b.grad.norm() > 1e-8 * g.norm():
            assert relerr(a.grad, b.grad) < bound, name
        else:  # a gradient that is zero up to roundoff (e.g. d=1: the token is +-1)
            assert a.grad.double().norm() < 1e-5 * g.norm(), name


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=token_cases(max_hw=16, max_size=8), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=8)
def test_fast_backward_matches_reference(backend, device, case, seed):
    with forced(backend):
        check_backward(backend, case, device, seed)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6)
def test_fast_backward_crosses_tiles_and_chunks(backend, device, data, seed):
    """As above on shapes crossing the forward's tiles/chunks, large Triton windows too."""
    case = data.draw(crossing_cases(backend, large_window=backend == "triton" and data.draw(st.booleans())))
    with crossing(backend):
        check_backward(backend, case, device, seed)


HEAD_ISAS = ("avx512", "avx2", "baseline")  # the compiled float32 head's variants (OMNIFM_CPU_HEAD_ISA caps it)


def check_float32_gradients(case, seed):
    """The compiled float32 backward (its fused head) against the float64 reference: at
    most ~3x the float32 reference's own error, plus a floor a little above the forward's
    (each parameter gradient sums over B*K*K bins)."""
    size = case["size"]
    base = make_inputs(**case)
    fast, ref32 = ([t.float().requires_grad_() for t in base] for _ in range(2))
    ref64 = [t.clone().requires_grad_() for t in base]
    g = torch.randn(case["B"], case["d"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with forced("ext"):
        spectral_token(*fast, size=size).backward(g.float())
    spectral_token_ref(*ref32, size=size).backward(g.float())
    spectral_token_ref(*ref64, size=size).backward(g)
    for name, a, b, c in zip(NAMES, fast, ref32, ref64):
        assert a.grad.dtype == torch.float32, name
        if c.grad.norm() > 1e-6 * g.norm():
            assert relerr(a.grad, c.grad) <= 3 * relerr(b.grad, c.grad) + 1e-5, name
        else:  # zero up to roundoff (e.g. d=1: the token is +-1)
            assert a.grad.double().norm() < 1e-4 * g.norm(), name


@pytest.mark.parametrize("isa", HEAD_ISAS)
@given(case=token_cases(max_hw=16, max_size=8, batch=st.integers(1, 4), d=st.integers(1, 40)),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10, deadline=None)
def test_float32_head_matches_reference(isa, case, seed):
    """Every compiled variant of the float32 head, forward and backward, on shapes that
    end blocks of 8 bins and tiles of 16 columns (m, h, d) part-way, x's gradient too."""
    if ("ext", "cpu") not in BACKENDS:
        pytest.skip("ext not available here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIFM_CPU_HEAD_ISA", isa)
        with forced("ext"):
            check_forward("ext", case, torch.float32, "cpu")
        check_float32_gradients(case, seed)


def test_float32_head_wide_and_many_bins():
    """Widths over several 16-column tiles with ragged ends and 100 bins (12 blocks of 8
    and a ragged one), in every variant."""
    if ("ext", "cpu") not in BACKENDS:
        pytest.skip("ext not available here")
    case = dict(B=3, C=3, H=23, W=21, size=10, m=37, h=70, d=53, seed=11)
    for isa in HEAD_ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMNIFM_CPU_HEAD_ISA", isa)
            with forced("ext"):
                check_forward("ext", case, torch.float32, "cpu")
            check_float32_gradients(case, seed=3)


@pytest.mark.parametrize("qualname", ["omnifm::spectral_token", "omnifm::spectral_token_triton"])
def test_opcheck(qualname):
    backend = "triton" if qualname.endswith("triton") else "ext"
    if backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 12, 10, 6, 5, 7, 9, dtype=torch.float32,
                                                        device=dict(BACKENDS)[backend])]
    op = getattr(torch.ops.omnifm, qualname.split("::")[1])
    torch.library.opcheck(op, (*inputs, 6))


@pytest.mark.parametrize("grad_bins", [True, False])
def test_opcheck_ext_backward(grad_bins):
    """The compiled backward as an op of its own (fake kernel, schema, dispatch); with
    grad_bins=False its last output is empty and the parameters' gradients are unchanged."""
    if "ext" not in dict(BACKENDS):
        pytest.skip("ext not available here")
    x, *params = make_inputs(3, 2, 12, 10, 6, 5, 7, 9, dtype=torch.float32)
    grad = torch.randn(3, 9, generator=torch.Generator().manual_seed(4))
    torch.library.opcheck(torch.ops.omnifm.spectral_token_backward, (grad, x, *params, 6, grad_bins))
    *grads, g_s = torch.ops.omnifm.spectral_token_backward(grad, x, *params, 6, grad_bins)
    assert g_s.shape == ((3, 2, 6, 6) if grad_bins else (0,))
    *other, _ = torch.ops.omnifm.spectral_token_backward(grad, x, *params, 6, not grad_bins)
    for a, b in zip(grads, other):
        assert torch.equal(a, b)


@given(case=token_cases(max_hw=16, max_size=9, batch=st.integers(1, 11), d=st.integers(1, 40)),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=12, deadline=None)
def test_saving_forward_and_kept_backward_equal_recompute(case, seed):
    """A training forward (spectral_token_saving) gives spectral_token's tokens bit for
    bit, and the backward that reads what it kept gives the recomputing backward's
    gradients bit for bit, on ragged 8-bin blocks and 16-column tiles and batches of
    several sample groups; its kept tensor has the size the fake kernel announces."""
    if ("ext", "cpu") not in BACKENDS:
        pytest.skip("ext not available here")
    size = case["size"]
    x, *params = make_inputs(**case, dtype=torch.float32)
    out, kept = torch.ops.omnifm.spectral_token_saving(x, *params, size)
    assert kept.shape == (kept_numel(case["B"], case["C"], case["m"], case["h"], case["d"], size * size),)
    assert torch.equal(out, torch.ops.omnifm.spectral_token(x, *params, size))
    grad = torch.randn(case["B"], case["d"], generator=torch.Generator().manual_seed(seed))
    from_kept = torch.ops.omnifm.spectral_token_backward(grad, x, *params, size, True, kept)
    recomputed = torch.ops.omnifm.spectral_token_backward(grad, x, *params, size, True)
    for name, a, b in zip(("mix_weight", "freq_embed", "w1", "b1", "w2", "b2", "bins"), from_kept, recomputed):
        assert torch.equal(a, b), name


def test_saving_opcheck_and_float64():
    """spectral_token_saving as an op (fake kernel, schema, dispatch) in both dtypes; in
    float64 it keeps nothing and the backward recomputes; a kept tensor of the wrong
    size or dtype is refused, naming it."""
    if ("ext", "cpu") not in BACKENDS:
        pytest.skip("ext not available here")
    for dtype in (torch.float32, torch.float64):
        x, *params = make_inputs(3, 2, 12, 10, 6, 5, 7, 9, dtype=dtype)
        torch.library.opcheck(torch.ops.omnifm.spectral_token_saving, (x, *params, 6))
        out, kept = torch.ops.omnifm.spectral_token_saving(x, *params, 6)
        assert kept.numel() == (0 if dtype == torch.float64 else kept_numel(3, 2, 5, 7, 9, 36))
        grad = torch.randn(3, 9, dtype=dtype, generator=torch.Generator().manual_seed(1))
        torch.library.opcheck(torch.ops.omnifm.spectral_token_backward, (grad, x, *params, 6, False, kept))
    x, *params = make_inputs(3, 2, 12, 10, 6, 5, 7, 9, dtype=torch.float32)
    _, kept = torch.ops.omnifm.spectral_token_saving(x, *params, 6)
    grad = torch.randn(3, 9)
    for bad in (kept[:-1], kept.double()):
        with pytest.raises(ValueError, match="^kept:"):
            torch.ops.omnifm.spectral_token_backward(grad, x, *params, 6, False, bad)


def test_ext_backward_independent_of_threads():
    """The float32 backward sums parameter gradients over fixed sample groups, in a
    fixed order: bitwise the same with 1 and 2 threads, kept or recomputed. (The head's
    2.4M multiply-adds, 4.8M backward, are over the floor under which the kernels run
    serially, kMinParallelWork in parallel.h.)"""
    if ("ext", "cpu") not in BACKENDS:
        pytest.skip("ext not available here")
    x, *params = make_inputs(13, 3, 16, 16, 8, 5, 64, 40, dtype=torch.float32)
    grad = torch.randn(13, 40, generator=torch.Generator().manual_seed(2))
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, kept = torch.ops.omnifm.spectral_token_saving(x, *params, 8)
            results.append((out, *torch.ops.omnifm.spectral_token_backward(grad, x, *params, 8, True, kept),
                            *torch.ops.omnifm.spectral_token_backward(grad, x, *params, 8, True)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_token_head_is_reference_tail():
    x, *params = make_inputs(2, 2, 10, 10, 4, 3, 5, 6)
    from omnifm.ops import lowpass_spectrum_ref

    s = lowpass_spectrum_ref(x, 4, log=True)
    assert relerr(token_head(s, *params), spectral_token_ref(x, *params, size=4)) < 1e-14


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
def test_errors_name_the_argument(backend):
    if backend != "reference" and backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    x, mix, emb, w1, b1, w2, b2 = make_inputs(2, 3, 8, 8, 4, 5, 6, 7, dtype=torch.float32)
    good = dict(mix_weight=mix, freq_embed=emb, w1=w1, b1=b1, w2=w2, b2=b2)

    def call(x=x, size=4, **over):
        return spectral_token(x, **{**good, **over}, size=size)

    cases = [
        (lambda: call(x=x[0]), ValueError, "x"),
        (lambda: call(x=x.long()), TypeError, "x"),
        (lambda: call(x=x[:, :0]), ValueError, "x"),
        (lambda: call(size=9), ValueError, "size"),
        (lambda: call(size=0), ValueError, "size"),
        (lambda: call(size="4"), TypeError, "size"),
        (lambda: call(mix_weight=mix[:, :2]), ValueError, "mix_weight"),
        (lambda: call(mix_weight=mix.int()), TypeError, "mix_weight"),
        (lambda: call(freq_embed=emb[:-1]), ValueError, "freq_embed"),
        (lambda: call(w1=w1[:, :-1]), ValueError, "w1"),
        (lambda: call(b1=b1[:-1]), ValueError, "b1"),
        (lambda: call(w2=w2[:, :-1]), ValueError, "w2"),
        (lambda: call(b2=b2[None]), ValueError, "b2"),
        (lambda: call(b2=b2.double()), TypeError, "b2"),
        (lambda: call(w2=w2.to("meta")), ValueError, "w2"),
        (lambda: call(w1="w1"), TypeError, "w1"),
    ]
    with forced(backend):
        for fn, exc, name in cases:
            with pytest.raises(exc, match=rf"^{name}:"):
                fn()


def test_cpu_auto_dispatch_by_size():
    """On CPU, auto runs ext where the measured crossover says it is not slower: x of at
    least CPU_EXT_MIN_ELEMENTS elements, or below that a float32 head of at most
    CPU_EXT_MAX_HEAD_WORK multiply-adds (each per mode: forward-only, or recording
    gradients); everywhere else, and for float64 below the floor, the reference."""
    import importlib
    from unittest import mock

    if ("ext", "cpu") not in BACKENDS:
        pytest.skip("ext not available here")
    module = importlib.import_module("omnifm.ops.spectral_token")
    floors, ceilings = module.CPU_EXT_MIN_ELEMENTS, module.CPU_EXT_MAX_HEAD_WORK

    def runs_reference(x, d, grad, h=5, dtype=torch.float32):
        params = [p.to(dtype).requires_grad_(grad) for p in make_inputs(1, 1, 4, 4, 4, 3, h, d)[1:]]
        with mock.patch.object(module, "spectral_token_ref", wraps=module.spectral_token_ref) as ref:
            with torch.set_grad_enabled(grad):
                spectral_token(x.to(dtype), *params, size=4)
        return ref.call_count == 1

    for grad in (False, True):
        per_sample = module.head_work(1, 4, 3, 50, 300)
        fits = ceilings[grad] // per_sample  # samples of 4x4 whose head is at most the ceiling
        assert 16 * (fits + 1) < floors[grad]  # both batches are below the elements floor
        assert not runs_reference(torch.rand(fits, 1, 4, 4), 300, grad, h=50)
        assert runs_reference(torch.rand(fits + 1, 1, 4, 4), 300, grad, h=50)
        assert runs_reference(torch.rand(2, 1, 4, 4), 6, grad, dtype=torch.float64)  # no head allowance
        # One image whose head is past the ceiling: the reference below the floor, ext at it.
        wide = ceilings[grad] // (4 * 4 * 50) + 1  # d with 16 bins * h=50 * (m + d) past the ceiling
        assert module.head_work(1, 4, 3, 50, wide) > ceilings[grad]
        assert runs_reference(torch.rand(1, 1, 8, floors[grad] // 8 - 1), wide, grad, h=50)
        assert not runs_reference(torch.rand(1, 1, 8, floors[grad] // 8), wide, grad, h=50)