import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.ops import spectral_token, spectral_token_ref
from omnifm.ops.spectral_token import token_head
from tests.helpers import assert_close_to_ref, fast_backends, forced, relerr
from tests.ops.test_lowpass_spectrum import numpy_oracle

BACKENDS = fast_backends("spectral_token")
NAMES = ("x", "mix_weight", "freq_embed", "w1", "b1", "w2", "b2")


def make_inputs(B, C, H, W, size, m, h, d, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    x = (torch.rand(B, C, H, W, generator=g, dtype=torch.float64) + 0.1).to(device, dtype)
    return [x, r(m, C, scale=C ** -0.5), r(size * size, m, scale=0.1), r(h, m, scale=m ** -0.5),
            r(h, scale=0.1), r(d, h, scale=h ** -0.5), r(d, scale=0.1)]


@st.composite
def token_cases(draw, max_hw=24, max_size=None):
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    top = min(H, W) if max_size is None else min(H, W, max_size)
    return dict(B=draw(st.integers(1, 3)), C=draw(st.integers(1, 3)), H=H, W=W,
                size=draw(st.integers(1, top)), m=draw(st.integers(1, 20)), h=draw(st.integers(1, 40)),
                d=draw(st.integers(1, 80)), seed=draw(st.integers(0, 2**31 - 1)))


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


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=token_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=20)
def test_fast_matches_reference(backend, device, case, dtype):
    if backend == "triton":
        dtype = torch.float32
    size = case["size"]
    inputs64 = make_inputs(**case, device=device)
    inputs = [t.to(dtype) for t in inputs64]
    with forced(backend):
        out = spectral_token(*inputs, size=size)
    assert out.dtype == dtype
    assert_close_to_ref(out, spectral_token_ref(*inputs64, size=size), spectral_token_ref(*inputs, size=size),
                        dtype, backend)
    assert torch.allclose(out.double().norm(dim=1), torch.ones(out.shape[0], dtype=torch.float64, device=device),
                          atol=1e-4)


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b[0] == "triton"])
def test_triton_large_window_path(backend, device):
    """Windows past the fused limit go through the lowpass kernel + PyTorch head."""
    inputs = [t.float() for t in make_inputs(2, 2, 40, 36, 20, 6, 8, 10, device=device)]
    with forced("triton"):
        out = spectral_token(*inputs, size=20)
    assert relerr(out, spectral_token_ref(*[t.double() for t in inputs], size=20)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_images_gpu(dtype):
    inputs = make_inputs(16, 3, 224, 224, 16, 32, 64, 128, dtype=torch.float32, device="cuda")
    x = inputs[0].to(dtype)
    with forced("triton"):
        out = spectral_token(x, *inputs[1:], size=16)
    ref_low = spectral_token_ref(x, *inputs[1:], size=16)
    ref64 = spectral_token_ref(x.double(), *[t.double() for t in inputs[1:]], size=16)
    assert_close_to_ref(out, ref64, ref_low, dtype, "triton")


def test_gradcheck_reference():
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 7, 6, 4, 3, 5, 4)]
    assert torch.autograd.gradcheck(lambda *a: spectral_token_ref(*a, size=4), inputs)


def test_gradcheck_ext():
    if "ext" not in dict(BACKENDS):
        pytest.skip("ext not available here")
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 9, 7, 5, 3, 6, 4, seed=3)]
    with forced("ext"):
        assert torch.autograd.gradcheck(lambda *a: spectral_token(*a, size=5), inputs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=token_cases(max_hw=16, max_size=8))
@settings(max_examples=8)
def test_fast_backward_matches_reference(backend, device, case):
    dtype = torch.float64 if backend == "ext" else torch.float32
    size = case["size"]
    base = make_inputs(**case, device=device)
    fast = [t.detach().to(dtype).requires_grad_() for t in base]
    ref = [t.detach().requires_grad_() for t in base]
    with forced(backend):
        out = spectral_token(*fast, size=size)
    g = torch.randn(out.shape, dtype=torch.float64, device=device)
    out.backward(g.to(dtype))
    spectral_token_ref(*ref, size=size).backward(g)
    bound = 1e-9 if dtype == torch.float64 else 1e-3
    for name, a, b in zip(NAMES, fast, ref):
        if b.grad.norm() > 1e-8 * g.norm():
            assert relerr(a.grad, b.grad) < bound, name
        else:  # a gradient that is zero up to roundoff (e.g. d=1: the token is +-1)
            assert a.grad.double().norm() < 1e-5 * g.norm(), name


@pytest.mark.parametrize("qualname", ["omnifm::spectral_token", "omnifm::spectral_token_triton"])
def test_opcheck(qualname):
    backend = "triton" if qualname.endswith("triton") else "ext"
    if backend not in dict(BACKENDS):
        pytest.skip(f"{backend} not available here")
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 12, 10, 6, 5, 7, 9, dtype=torch.float32,
                                                        device=dict(BACKENDS)[backend])]
    op = getattr(torch.ops.omnifm, qualname.split("::")[1])
    torch.library.opcheck(op, (*inputs, 6))


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
