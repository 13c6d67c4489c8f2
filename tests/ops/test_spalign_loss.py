"""spalign_loss: the compiled CPU op (one call and one autograd node each way) against a
per-sample loop oracle and the PyTorch reference; its gradients, opcheck, dispatch and
torch.compile. The definition and argument errors are also covered in
test_eca_attention.py."""
import importlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifm.ops import spalign_loss, spalign_loss_ref
from tests.helpers import FLOOR, fast_backends, forced, relerr

HAS_EXT = ("ext", "cpu") in fast_backends("spalign_loss")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="omnifm_ext has no spalign_loss kernel here")


def oracle(s, protos):
    """float64, one sample at a time: sum_b ||s_b - mean_j protos_bj||^2 / B."""
    s, protos = s.detach().double(), protos.detach().double()
    return sum(((s[b] - protos[b].sum(0) / protos.shape[1]) ** 2).sum() for b in range(s.shape[0])) / s.shape[0]


@st.composite
def cases(draw):
    # d crosses the vector widths (8, 16 lanes) and their tails; k = 1 has no mean to take.
    return dict(B=draw(st.integers(1, 40)), k=draw(st.integers(1, 9)), d=draw(st.integers(1, 150)),
                seed=draw(st.integers(0, 2**31 - 1)), scale=draw(st.sampled_from([1e-3, 1.0, 30.0])))


def make(B, k, d, seed, scale, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, d, generator=g, dtype=torch.float64) * scale
    protos = torch.randn(B, k, d, generator=g, dtype=torch.float64) * scale
    return s.to(dtype), protos.to(dtype)


@needs_ext
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=40)
def test_ext_forward_matches_oracle(case, dtype):
    s, protos = make(**case, dtype=dtype)
    with forced("ext"):
        out = spalign_loss(s, protos)
    assert out.shape == () and out.dtype == dtype
    want, low = oracle(s, protos), spalign_loss_ref(s, protos)
    assert relerr(out, want) <= 3 * relerr(low, want) + FLOOR[dtype]


@needs_ext
@given(case=cases(), weight=st.floats(-3.0, 3.0).filter(lambda w: abs(w) > 1e-3))
@settings(max_examples=30)
def test_ext_gradients_match_reference(case, weight):
    """Both gradients, for an upstream gradient that is not 1 (the loss is scaled by
    lambda in training), against autograd through the float64 reference."""
    base = make(**case)
    fast, ref = ([t.clone().requires_grad_() for t in base] for _ in range(2))
    with forced("ext"):
        (weight * spalign_loss(*fast)).backward()
    (weight * spalign_loss_ref(*ref)).backward()
    for name, a, b in zip(("s", "protos"), fast, ref):
        assert a.grad.shape == b.grad.shape, name
        if b.grad.norm() > 0:
            assert relerr(a.grad, b.grad) < 1e-12, name
        else:
            assert a.grad.norm() == 0, name


@needs_ext
def test_ext_float32_gradients_and_gradcheck():
    s, protos = make(7, 3, 37, seed=3, scale=1.0)
    with forced("ext"):
        assert torch.autograd.gradcheck(spalign_loss, (s.requires_grad_(), protos.requires_grad_()))
    fast = [t.detach().float().requires_grad_() for t in (s, protos)]
    ref = [t.detach().clone().requires_grad_() for t in (s, protos)]
    with forced("ext"):
        spalign_loss(*fast).backward()
    spalign_loss_ref(*ref).backward()
    for a, b in zip(fast, ref):
        assert a.grad.dtype == torch.float32 and relerr(a.grad, b.grad) < 1e-6


@needs_ext
def test_opcheck():
    s, protos = make(5, 2, 19, seed=1, scale=1.0, dtype=torch.float32)
    torch.library.opcheck(torch.ops.omnifm.spalign_loss, (s.requires_grad_(), protos.requires_grad_()))
    torch.library.opcheck(torch.ops.omnifm.spalign_loss_backward, (torch.tensor(0.5), s.detach(), protos.detach()))


def test_dispatch_and_compile():
    """CPU float32/float64 with the extension: the compiled op, not the reference;
    forced reference and float16 run the reference; torch.compile traces it."""
    module = importlib.import_module("omnifm.ops.spalign_loss")
    s, protos = make(4, 2, 10, seed=2, scale=1.0, dtype=torch.float32)
    s.requires_grad_()
    with mock.patch.object(module, "spalign_loss_ref", wraps=module.spalign_loss_ref) as ref:
        eager = spalign_loss(s, protos)
        assert ref.call_count == (0 if HAS_EXT else 1)
        with forced("reference"):
            spalign_loss(s, protos)
        assert ref.call_count == (1 if HAS_EXT else 2)
        half = spalign_loss(s.detach().half(), protos.half())
        assert half.dtype == torch.float16 and ref.call_count == (2 if HAS_EXT else 3)
    compiled = torch.compile(spalign_loss, fullgraph=True, backend="aot_eager")
    out = compiled(s, protos)
    out.backward()
    assert relerr(out, eager) < 1e-6 and s.grad is not None


@needs_ext
def test_kernel_errors_name_the_argument():
    """The compiled op checks its own inputs when called directly."""
    s, protos = make(3, 2, 6, seed=0, scale=1.0, dtype=torch.float32)
    with pytest.raises(ValueError, match="protos"):
        torch.ops.omnifm.spalign_loss(s, protos[:2])
    with pytest.raises(TypeError, match="protos"):
        torch.ops.omnifm.spalign_loss(s, protos.double())
    with pytest.raises(TypeError, match="s"):
        torch.ops.omnifm.spalign_loss(s.half(), protos.half())
    with pytest.raises(ValueError, match="grad"):
        torch.ops.omnifm.spalign_loss_backward(torch.ones(2), s, protos)
