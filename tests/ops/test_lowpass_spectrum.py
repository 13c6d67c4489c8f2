import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.ops import BackendUnavailableError, lowpass_spectrum, lowpass_spectrum_ref
from tests.helpers import assert_close_to_ref, fast_backends, forced, relerr

BACKENDS = fast_backends("lowpass_spectrum")


def numpy_oracle(x, size):
    """Independent oracle: numpy's FFT, window picked by frequency (mod H, W), no shift."""
    x = x.detach().double().cpu().numpy()
    H, W = x.shape[-2:]
    spec = np.abs(np.fft.fft2(x)) / (H * W)
    f = np.arange(size) - size // 2
    return torch.from_numpy(spec[..., (f % H)[:, None], (f % W)[None, :]])


@st.composite
def images(draw, max_hw=40):
    B, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    size = draw(st.integers(1, min(H, W)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # A positive offset gives a DC term like real images; randn adds every frequency.
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) + 0.5
    return x, size


@given(images(max_hw=64), st.booleans())
@settings(max_examples=40)
def test_reference_matches_numpy_oracle(case, log):
    x, size = case
    want = numpy_oracle(x, size)
    if log:
        want = torch.log1p(want)
    assert relerr(lowpass_spectrum_ref(x, size, log=log), want) < 1e-12


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=images(), log=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=25)
def test_fast_matches_reference(backend, device, case, log, dtype):
    x, size = case
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32  # the Triton kernel takes float16/bfloat16/float32
    x = x.to(device)
    with forced(backend):
        out = lowpass_spectrum(x.to(dtype), size, log=log)
    assert out.dtype == dtype and out.device == x.device
    ref64 = lowpass_spectrum_ref(x, size, log=log)
    assert_close_to_ref(out, ref64, lowpass_spectrum_ref(x.to(dtype), size, log=log), dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_gpu(dtype):
    x = torch.rand(8, 3, 97, 130, device="cuda") + 0.1
    with forced("triton"):
        out = lowpass_spectrum(x.to(dtype), 16, log=True)
    ref_low = lowpass_spectrum_ref(x.to(dtype), 16, log=True)
    assert_close_to_ref(out, lowpass_spectrum_ref(x.double(), 16, log=True), ref_low, dtype, "triton")


def test_gradcheck_reference():
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lowpass_spectrum_ref(t, 4, log=True), (x,))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_fast(backend, device):
    dtype = torch.float64 if backend == "ext" else torch.float32
    x = (torch.randn(2, 2, 9, 8, dtype=torch.float64) + 0.3).to(device)
    if dtype == torch.float64:
        with forced(backend):
            assert torch.autograd.gradcheck(lambda t: lowpass_spectrum(t, 5, log=True), (x.requires_grad_(),))
    # Fast backward against the reference backward on random data.
    xf = x.detach().to(dtype).requires_grad_()
    xr = x.detach().requires_grad_()
    with forced(backend):
        out = lowpass_spectrum(xf, 5)
    g = torch.randn(out.shape, dtype=torch.float64, device=device)
    out.backward(g.to(dtype))
    lowpass_spectrum_ref(xr, 5).backward(g)
    assert relerr(xf.grad, xr.grad) < (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("qualname", ["omnifm::lowpass_spectrum", "omnifm::lowpass_spectrum_triton"])
def test_opcheck(qualname):
    backend = "ext" if qualname.endswith("spectrum") else "triton"
    if backend not in [b for b, _ in BACKENDS]:
        pytest.skip(f"{backend} not available here")
    device = dict(BACKENDS)[backend]
    op = getattr(torch.ops.omnifm, qualname.split("::")[1])
    x = torch.randn(2, 3, 10, 9, device=device, requires_grad=True)
    torch.library.opcheck(op, (x, 6, True))
    torch.library.opcheck(op, (x.detach(), 3, False))


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
def test_errors_name_the_argument(backend):
    if backend != "reference" and backend not in [b for b, _ in BACKENDS]:
        pytest.skip(f"{backend} not available here")
    x = torch.randn(2, 3, 8, 6)
    cases = [
        (lambda: lowpass_spectrum(x[0], 4), ValueError, "x"),
        (lambda: lowpass_spectrum(x.to(torch.int32), 4), TypeError, "x"),
        (lambda: lowpass_spectrum(x.numpy(), 4), TypeError, "x"),
        (lambda: lowpass_spectrum(x, 0), ValueError, "size"),
        (lambda: lowpass_spectrum(x, 7), ValueError, "size"),
        (lambda: lowpass_spectrum(x, 4.0), TypeError, "size"),
        (lambda: lowpass_spectrum(x, True), TypeError, "size"),
        (lambda: lowpass_spectrum(x, 4, log=1), TypeError, "log"),
        (lambda: lowpass_spectrum(torch.randn(1, 1, 0, 4), 1), ValueError, "x"),
    ]
    with forced(backend):
        for fn, exc, name in cases:
            with pytest.raises(exc, match=rf"^{name}:"):
                fn()


def test_direct_op_call_validates():
    if "ext" not in [b for b, _ in BACKENDS]:
        pytest.skip("ext not available here")
    with pytest.raises(ValueError, match="size"):
        torch.ops.omnifm.lowpass_spectrum(torch.randn(1, 1, 4, 4), 5, False)
    with pytest.raises(TypeError, match="x"):
        torch.ops.omnifm.lowpass_spectrum(torch.randn(1, 1, 4, 4).half(), 2, False)


def test_forcing_an_unusable_backend_raises():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    with forced("triton"), pytest.raises(BackendUnavailableError, match="triton"):
        lowpass_spectrum(x, 4)
    with forced("bogus"), pytest.raises(ValueError, match="OMNIFM_BACKEND"):
        lowpass_spectrum(x, 4)


def test_half_precision_on_cpu_uses_reference():
    x = torch.rand(2, 1, 16, 16) + 0.1
    out = lowpass_spectrum(x.bfloat16(), 8)
    assert out.dtype == torch.bfloat16
    assert relerr(out, lowpass_spectrum_ref(x.double(), 8)) < 2e-2


@pytest.mark.parametrize("shape,size", [((1, 1, 1, 1), 1), ((2, 1, 1024, 1024), 16), ((1, 2, 1024, 3), 3),
                                        ((1, 1, 300, 257), 257), ((1, 1, 33, 1000), 33)])
def test_extreme_shapes_ext(shape, size):
    if "ext" not in dict(BACKENDS):
        pytest.skip("ext not available here")
    x = torch.rand(*shape, dtype=torch.float64) + 0.1
    with forced("ext"):
        out = lowpass_spectrum(x, size, log=True)
    assert relerr(out, torch.log1p(numpy_oracle(x, size))) < 1e-12


@pytest.mark.parametrize("shape,size", [((1, 1, 1, 1), 1), ((1, 2, 90, 70), 70), ((1, 1, 3, 130), 3)])
def test_multi_block_and_tiny_triton(shape, size):
    """Windows over 64 span several programs per plane; 1x1 images one partial tile."""
    if "triton" not in dict(BACKENDS):
        pytest.skip("triton not available here")
    x = torch.rand(*shape, dtype=torch.float64) + 0.1
    with forced("triton"):
        out = lowpass_spectrum(x.float().to(dict(BACKENDS)["triton"]), size)
    assert relerr(out, numpy_oracle(x, size)) < 1e-5
