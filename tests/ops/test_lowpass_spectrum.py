import ast
import contextlib
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifm
from omnifm.ops import BackendUnavailableError, lowpass_spectrum, lowpass_spectrum_ref
from tests.helpers import assert_close_to_ref, fast_backends, forced, relerr

BACKENDS = fast_backends("lowpass_spectrum")
TRITON_DIR = pathlib.Path(omnifm.__file__).parent / "ops" / "triton"

# Tiles and chunks the fast paths split the work into, and the shapes that cross them.
TILE = 16  # the smallest Triton tile (tl.dot needs >= 16); small_tiles() sets every tile to it
CROSS = (2 * TILE + 1, 3 * TILE - 1)  # > 2 tiles, ragged last tile
# The C++ kernels loop over chunks of samples (as many as fit about 1 MiB, so a small
# batch is one chunk); crossing() sets chunks of CHUNK_SAMPLES, and these batches then
# end in a ragged last chunk of 1.
CHUNK_SAMPLES = 2
CHUNKED_BATCHES = (9, 11, 13)


@contextlib.contextmanager
def small_tiles():
    """Every Triton tile of the spectral kernels at TILE, so small images cross them:
    plane tiles (rows, columns), window blocks, token d-blocks."""
    from omnifm.ops.triton import _window
    from omnifm.ops.triton import lowpass_spectrum as tl_lowpass
    from omnifm.ops.triton import spectral_token as tl_token

    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((_window, "BLOCK_H"), (_window, "BLOCK_W"), (tl_lowpass, "MAX_BLOCK"),
                             (tl_token, "MAX_BLOCK_D")):
            mp.setattr(module, name, TILE)  # raises if the knob was renamed
        yield


@contextlib.contextmanager
def small_chunks():
    """C++ chunks of CHUNK_SAMPLES samples (see CHUNKED_BATCHES)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIFM_CPU_CHUNK_SAMPLES", str(CHUNK_SAMPLES))
        yield


@contextlib.contextmanager
def crossing(backend):
    """Forced backend with its tiles (Triton) or chunks (C++) small enough to cross."""
    with forced(backend), (small_tiles() if backend == "triton" else small_chunks()):
        yield


def numpy_oracle(x, size):
    """Independent oracle: numpy's FFT, window picked by frequency (mod H, W), no shift."""
    x = x.detach().double().cpu().numpy()
    H, W = x.shape[-2:]
    spec = np.abs(np.fft.fft2(x)) / (H * W)
    f = np.arange(size) - size // 2
    return torch.from_numpy(spec[..., (f % H)[:, None], (f % W)[None, :]])


def random_image(shape, seed, device="cpu"):
    """float64 noise plus a positive offset: a DC term like real images, every frequency present."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5).to(device)


@st.composite
def images(draw, max_hw=40, batch=st.integers(1, 3)):
    B, C = draw(batch), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    size = draw(st.integers(1, min(H, W)))
    return random_image((B, C, H, W), draw(st.integers(0, 2**31 - 1))), size


@st.composite
def crossing_images(draw, backend):
    """Shapes past the first tile/chunk of backend: for Triton, H and W over 2 tiles
    with a ragged last one and windows of 1 or over 2 blocks; for C++, chunked batches."""
    if backend != "triton":
        return draw(images(batch=st.sampled_from(CHUNKED_BATCHES)))
    B, C = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H, W = draw(st.integers(*CROSS)), draw(st.integers(*CROSS))
    size = draw(st.one_of(st.integers(1, TILE), st.integers(CROSS[0], min(H, W))))
    return random_image((B, C, H, W), draw(st.integers(0, 2**31 - 1))), size


def dot_calls(path):
    """The tl.dot(...) calls of a Python source file, as ast.Call nodes."""
    return [node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.dot"]


@pytest.mark.parametrize("module", ["_window.py", "lowpass_spectrum.py", "spectral_token.py"])
def test_triton_dots_are_ieee(module):
    """Team decision: every float32 tl.dot of the spectral kernels runs IEEE float32.
    The interpreter computes IEEE whatever the flag says, so only this can catch TF32."""
    calls = dot_calls(TRITON_DIR / module)
    if module != "lowpass_spectrum.py":  # its dots live in _window.window_block
        assert calls, f"no tl.dot found in {module}: the guard would check nothing"
    for call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("input_precision"), ast.Constant) and kw["input_precision"].value == "ieee", \
            f"{module}:{call.lineno}: {ast.unparse(call)} lacks input_precision=\"ieee\""


@given(images(max_hw=64), st.booleans())
@settings(max_examples=40)
def test_reference_matches_numpy_oracle(case, log):
    x, size = case
    want = numpy_oracle(x, size)
    if log:
        want = torch.log1p(want)
    assert relerr(lowpass_spectrum_ref(x, size, log=log), want) < 1e-12


def check_forward(backend, x, size, log, dtype):
    out = lowpass_spectrum(x.to(dtype), size, log=log)
    assert out.dtype == dtype and out.device == x.device
    ref_low = lowpass_spectrum_ref(x.to(dtype), size, log=log)
    assert_close_to_ref(out, lowpass_spectrum_ref(x, size, log=log), ref_low, dtype, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=images(), log=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=25)
def test_fast_matches_reference(backend, device, case, log, dtype):
    x, size = case
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32  # the Triton kernel takes float16/bfloat16/float32
    with forced(backend):
        check_forward(backend, x.to(device), size, log, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(data=st.data(), log=st.booleans())
@settings(max_examples=15)
def test_fast_crosses_tiles_and_chunks(backend, device, data, log):
    x, size = data.draw(crossing_images(backend))
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if backend == "triton" else [torch.float32, torch.float64]
    with crossing(backend):
        check_forward(backend, x.to(device), size, log, data.draw(st.sampled_from(dtypes)))


# Odd and even windows, H != W, odd H and W; Triton: windows of 3 blocks, 3 plane tiles.
CROSSING_CASES = {
    "triton": [((1, 2, 47, 35), 35), ((2, 1, 34, 44), 34), ((1, 1, 33, 47), 16), ((2, 1, 40, 37), 7)],
    "ext": [((9, 2, 13, 10), 9), ((11, 1, 12, 17), 12), ((13, 3, 7, 9), 1), ((11, 2, 6, 5), 4)],
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("log", [False, True])
def test_fast_crossing_cases(backend, device, case, log):
    shape, size = CROSSING_CASES[backend][case]
    x = random_image(shape, seed=case)
    dtype = torch.float32 if backend == "triton" else torch.float64
    with crossing(backend):
        out = lowpass_spectrum(x.to(device, dtype), size, log=log)
    want = torch.log1p(numpy_oracle(x, size)) if log else numpy_oracle(x, size)
    assert_close_to_ref(out, want, lowpass_spectrum_ref(x.to(dtype), size, log=log), dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_gpu(dtype):
    x = torch.rand(8, 3, 97, 130, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) + 0.1
    with forced("triton"):
        out = lowpass_spectrum(x.to(dtype), 16, log=True)
    ref_low = lowpass_spectrum_ref(x.to(dtype), 16, log=True)
    assert_close_to_ref(out, lowpass_spectrum_ref(x.double(), 16, log=True), ref_low, dtype, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,size", [((5, 3, 224, 224), 16), ((3, 2, 161, 150), 150), ((2, 1, 300, 257), 131)])
@pytest.mark.parametrize("log", [False, True])
def test_triton_default_tiles_gpu(shape, size, log):
    """Default tiles on a GPU: 224 and 161 span > 2 plane tiles with a ragged last one;
    windows of 150 and 131 span 3 window blocks, the last one ragged. Forward and backward."""
    x = random_image(shape, seed=size)
    xf = x.float().cuda().requires_grad_()
    xr = x.clone().requires_grad_()
    with forced("triton"):
        out = lowpass_spectrum(xf, size, log=log)
    ref = lowpass_spectrum_ref(xr, size, log=log)
    assert_close_to_ref(out, ref, lowpass_spectrum_ref(x.float(), size, log=log), torch.float32, "triton")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g.float().cuda())
    ref.backward(g)
    assert relerr(xf.grad, xr.grad) < 1e-4


def test_gradcheck_reference():
    x = random_image((2, 2, 7, 6), seed=0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lowpass_spectrum_ref(t, 4, log=True), (x,))


@pytest.mark.skipif("ext" not in dict(BACKENDS), reason="ext not available here")
@pytest.mark.parametrize("log", [False, True])
def test_gradcheck_ext(log):
    """Finite differences through the C++ forward (Triton takes no float64)."""
    x = random_image((2, 2, 9, 8), seed=1).requires_grad_()
    with forced("ext"):
        assert torch.autograd.gradcheck(lambda t: lowpass_spectrum(t, 5, log=log), (x,))


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(data=st.data(), log=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10)
def test_fast_backward_matches_reference(backend, device, data, log, seed):
    """The analytic backward (adjoint of the windowed DFT, through log1p) against
    autograd through the reference's full FFT, on shapes crossing the forward's tiles."""
    x, size = data.draw(crossing_images(backend))
    dtype = torch.float64 if backend == "ext" else torch.float32
    xf = x.to(device, dtype, copy=True).requires_grad_()
    with crossing(backend):
        out = lowpass_spectrum(xf, size, log=log)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(g.to(device, dtype))
    grads = []
    for t in (x, x.to(dtype)):  # float64 and same-dtype reference gradients
        t = t.detach().clone().requires_grad_()
        lowpass_spectrum_ref(t, size, log=log).backward(g.to(dtype=t.dtype))
        grads.append(t.grad)
    assert_close_to_ref(xf.grad, *grads, dtype, f"{backend} backward")


@pytest.mark.parametrize("qualname", ["omnifm::lowpass_spectrum", "omnifm::lowpass_spectrum_triton"])
def test_opcheck(qualname):
    backend = "ext" if qualname.endswith("spectrum") else "triton"
    if backend not in [b for b, _ in BACKENDS]:
        pytest.skip(f"{backend} not available here")
    device = dict(BACKENDS)[backend]
    op = getattr(torch.ops.omnifm, qualname.split("::")[1])
    x = random_image((2, 3, 10, 9), seed=2).float().to(device).requires_grad_()
    torch.library.opcheck(op, (x, 6, True))
    torch.library.opcheck(op, (x.detach(), 3, False))


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
def test_errors_name_the_argument(backend):
    if backend != "reference" and backend not in [b for b, _ in BACKENDS]:
        pytest.skip(f"{backend} not available here")
    x = random_image((2, 3, 8, 6), seed=3).float()
    cases = [
        (lambda: lowpass_spectrum(x[0], 4), ValueError, "x"),
        (lambda: lowpass_spectrum(x.to(torch.int32), 4), TypeError, "x"),
        (lambda: lowpass_spectrum(x.numpy(), 4), TypeError, "x"),
        (lambda: lowpass_spectrum(x, 0), ValueError, "size"),
        (lambda: lowpass_spectrum(x, 7), ValueError, "size"),
        (lambda: lowpass_spectrum(x, 4.0), TypeError, "size"),
        (lambda: lowpass_spectrum(x, True), TypeError, "size"),
        (lambda: lowpass_spectrum(x, 4, log=1), TypeError, "log"),
        (lambda: lowpass_spectrum(torch.zeros(1, 1, 0, 4), 1), ValueError, "x"),
    ]
    with forced(backend):
        for fn, exc, name in cases:
            with pytest.raises(exc, match=rf"^{name}:"):
                fn()


def test_direct_op_call_validates():
    if "ext" not in [b for b, _ in BACKENDS]:
        pytest.skip("ext not available here")
    with pytest.raises(ValueError, match="size"):
        torch.ops.omnifm.lowpass_spectrum(torch.zeros(1, 1, 4, 4), 5, False)
    with pytest.raises(TypeError, match="x"):
        torch.ops.omnifm.lowpass_spectrum(torch.zeros(1, 1, 4, 4).half(), 2, False)


def test_forcing_an_unusable_backend_raises():
    x = random_image((1, 1, 8, 8), seed=4)
    with forced("triton"), pytest.raises(BackendUnavailableError, match="triton"):
        lowpass_spectrum(x, 4)
    with forced("bogus"), pytest.raises(ValueError, match="OMNIFM_BACKEND"):
        lowpass_spectrum(x, 4)


def test_half_precision_on_cpu_uses_reference():
    x = random_image((2, 1, 16, 16), seed=5)
    out = lowpass_spectrum(x.bfloat16(), 8)
    assert out.dtype == torch.bfloat16
    assert relerr(out, lowpass_spectrum_ref(x, 8)) < 2e-2


@pytest.mark.parametrize("shape,size", [((1, 1, 1, 1), 1), ((2, 1, 1024, 1024), 16), ((1, 2, 1024, 3), 3),
                                        ((1, 1, 300, 257), 257), ((1, 1, 33, 1000), 33)])
def test_extreme_shapes_ext(shape, size):
    if "ext" not in dict(BACKENDS):
        pytest.skip("ext not available here")
    x = random_image(shape, seed=6)
    with forced("ext"):
        out = lowpass_spectrum(x, size, log=True)
    assert relerr(out, torch.log1p(numpy_oracle(x, size))) < 1e-12


@pytest.mark.parametrize("shape,size", [((1, 1, 1, 1), 1), ((1, 2, 90, 70), 70), ((1, 1, 3, 130), 3),
                                        ((1, 1, 140, 131), 131)])
def test_default_tiles_and_tiny_triton(shape, size):
    """Default tiles: windows over 64 span several programs per plane (131: 3 blocks,
    the last ragged), 90..140 rows or columns > 2 plane tiles; 1x1 images one partial tile."""
    if "triton" not in dict(BACKENDS):
        pytest.skip("triton not available here")
    x = random_image(shape, seed=7)
    with forced("triton"):
        out = lowpass_spectrum(x.float().to(dict(BACKENDS)["triton"]), size)
    assert relerr(out, numpy_oracle(x, size)) < 2e-6
