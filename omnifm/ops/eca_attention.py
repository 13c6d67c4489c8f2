"""eca_attention: cross-attention of backbone tokens to k retrieved prototypes (ECA).

    eca_attention(r, protos, wq, wk, wv, *, value_bias=None) -> Z (B, L, dh)
    Z = softmax((r Wq)(protos Wk)^T / sqrt(dh)) (protos Wv + value_bias)

r (B, L, d) tokens, protos (B, k, d), wq/wk/wv (d, dh), value_bias (dh,) or None. As
the attention weights of a token sum to 1, a value bias b adds b to every Z row. With k
keys only, the logits are r . A with A = Wq (protos Wk)^T / sqrt(dh), a (d, k) matrix
per sample: every backend computes at = A^T (B, k, d) and vp = protos Wv + b (B, k, dh) with small matmuls
(autograd handles them), then the core softmax(r . at^T) vp reads r once and writes Z
once; the (B, L, dh) query tensor is never formed. The core runs fused (ext, triton) or
as two bmm and a softmax in PyTorch (the reference backend). Gradients flow to r,
protos and every weight.

On CPU, auto dispatch runs forward-only calls (no gradient recorded) on the reference
backend, not ext: the fused forward does not beat the PyTorch core there, while its
backward does for tokens of width >= CPU_EXT_MIN_WIDTH (see CPU_EXT_SKIPPED).
OMNIFM_BACKEND=ext forces it for every call.

    eca_residual(x, protos, wq, wk, wv, *, value_bias=None) -> x + Z^T (B, d, L)

The same attention for channel-first tokens x (B, d, L) (a CNN feature map, flattened),
with wv (d, d) and the residual added: the adapter's spatial mode. On CPU with the
extension it is one compiled op each way (the projections, logits, softmax over k,
values and the add as batched products in that layout: no transposed copies of the
feature map, one autograd node); elsewhere it composes eca_attention's dispatch.

    eca_psp(r, protos, wq, wk, wv, out_weight, suffix) -> [Z out_weight^T | r | suffix]

The adapter's sequence mode with PSP (B, 2L + p, d): the prefix Z mapped to r's width,
the tokens, and the p suffix prompts (p, d) for every sample. On CPU with the extension
one compiled op each way (values mapped on the k prototype rows, one output, one
autograd node); elsewhere eca_attention with Wv out_weight^T as values, then a cat.
"""
import math

import torch

from . import _backend
from ._checks import check_same_device, check_same_dtype, check_tensor

OP = "eca_core"
RESIDUAL_OP = "eca_residual"
PSP_OP = "eca_psp"


def eca_attention_ref(r, protos, wq, wk, wv, *, value_bias=None):
    """PyTorch reference (the contract): the three projections and softmax attention."""
    q, key, v = r @ wq, protos @ wk, protos @ wv
    if value_bias is not None:
        v = v + value_bias
    attn = torch.softmax(q @ key.transpose(1, 2) / math.sqrt(wq.shape[1]), dim=-1)
    return attn @ v


def eca_core_ref(r, at, vp):
    """The rank-k core in PyTorch: softmax(r . at^T) vp, computed transposed: the logits
    as (B, k, L), normalised over dim 1 (ATen's CPU softmax over a last dimension of
    only k entries is 5-15x slower, measured), and Z^T = vp^T softmax (B, dh, L),
    returned as its (B, L, dh) transpose: a channel-first consumer (the adapter's
    spatial mode) reads it without a copy."""
    return (vp.transpose(1, 2) @ torch.softmax(at @ r.transpose(1, 2), dim=1)).transpose(1, 2)


def _validate(r, protos, wq, wk, wv, value_width=None, r_name="r", value_bias=None):
    """value_width: wv's columns (None: the head dimension of wq)."""
    check_tensor(r, r_name, ndim=3)
    check_tensor(protos, "protos", ndim=3)
    B, _, d = r.shape
    if protos.shape[0] != B or protos.shape[2] != d:
        raise ValueError(f"protos: expected (B={B}, k, d={d}), got {tuple(protos.shape)}")
    if protos.shape[1] < 1:
        raise ValueError("protos: needs at least one prototype (k >= 1)")
    check_tensor(wq, "wq", shape=(d, None))
    dh = wq.shape[1]
    if dh < 1:
        raise ValueError("wq: head dimension must be at least 1")
    check_tensor(wk, "wk", shape=(d, dh))
    check_tensor(wv, "wv", shape=(d, dh if value_width is None else value_width))
    named = {r_name: r, "protos": protos, "wq": wq, "wk": wk, "wv": wv}
    if value_bias is not None:
        check_tensor(value_bias, "value_bias", shape=(wv.shape[1],))
        named["value_bias"] = value_bias
    check_same_device(**named)
    check_same_dtype(**named)


# Measured at B=32 L=3136 d=dh=256 k=2 float32, 2 threads (bench/bench_eca.py on a shared
# 2-core VM): the fused CPU forward is 0.93-1.04x the PyTorch core, both bound by the page
# faults of their fresh (B, L, dh) output; forward+backward 1.16-1.22x (one pass over r
# and grad where autograd makes two).
CPU_EXT_SKIPPED = ("usable, but forward-only CPU calls run the reference backend's rank-k PyTorch core, which "
                   "the fused forward does not beat; calls that record gradients run ext (bench/bench_eca.py)")
# With gradients, the fused core wins on CPU only for wide tokens (python
# bench/bench_crossover.py --op eca_attention, 2026-11-29, forward+backward: ext is
# 0.9-1.6x the PyTorch core at d = 256, 1.0-1.3x at d = 64, 0.6-1.0x at d = 16, where
# its per-row softmax over k and the custom op's Python backward outweigh a row's work).
CPU_EXT_MIN_WIDTH = 32


def _ext_check(dev, dtype, needs_grad, width):
    why = _backend.ext_status(OP, dev) or (
        None if dtype in (torch.float32, torch.float64) else f"ext takes float32/float64, not {dtype}")
    if why is not None or dev != "cpu" or _backend.forced_backend() == "ext":
        return why
    if not needs_grad:
        return CPU_EXT_SKIPPED
    if width is not None and width < CPU_EXT_MIN_WIDTH:
        return (f"usable, but tokens of width {width} < {CPU_EXT_MIN_WIDTH} run faster on the reference "
                "backend's PyTorch core on CPU (bench/bench_crossover.py --op eca_attention)")
    return None


def backend_checks(dev, dtype, needs_grad=False, width=None):
    """{backend: () -> None | why not} for a device type and dtype; needs_grad (whether
    autograd records the call) and width (d of r; None: wide) decide between ext and
    the reference on CPU."""
    return {
        "reference": lambda: None,
        "ext": lambda: _ext_check(dev, dtype, needs_grad, width),
        "triton": lambda: _backend.triton_status(dev)
        or (None if dtype != torch.float64 else "the Triton kernel takes float16/bfloat16/float32"),
    }


def eca_attention(r, protos, wq, wk, wv, *, value_bias=None):
    """ECA cross-attention; see module doc. Output dtype = r's dtype; the layout may be
    a transposed view (call .contiguous() before .view())."""
    _validate(r, protos, wq, wk, wv, value_bias=value_bias)
    return _dispatched(r, protos, wq, wk, wv, value_bias)


def _dispatched(r, protos, wq, wk, wv, value_bias):
    """eca_attention on validated inputs: the small projections, then the core of the
    backend chosen for this call."""
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (r, protos, wq, wk, wv, value_bias) if t is not None)
    backend = _backend.backend_for(backend_checks, r.device.type, r.dtype, needs_grad, r.shape[-1])
    at = (protos @ wk) @ wq.transpose(0, 1) / math.sqrt(wq.shape[1])  # (B, k, d)
    vp = protos @ wv if value_bias is None else torch.addmm(value_bias, protos.flatten(0, 1), wv).view(
        *protos.shape[:2], -1)  # (B, k, dh)
    if backend == "ext":
        return torch.ops.omnifm.eca_core(r, at, vp)
    if backend == "triton":
        return torch.ops.omnifm.eca_core_triton(r, at, vp)
    return eca_core_ref(r, at, vp)


def eca_residual_ref(x, protos, wq, wk, wv, *, value_bias=None):
    """PyTorch reference of eca_residual: x + ECA(x^T)^T."""
    return x + eca_attention_ref(x.transpose(1, 2), protos, wq, wk, wv, value_bias=value_bias).transpose(1, 2)


def eca_residual(x, protos, wq, wk, wv, *, value_bias=None):
    """y = x + ECA(x^T, protos, wq, wk, wv, value_bias)^T for channel-first tokens x
    (B, d, L), e.g. a CNN feature map (B, d, h, w) flattened; wv (d, d), so Z has x's
    width. Output (B, d, L), x's dtype.

    On CPU with the extension this is one compiled call each way (projections, logits,
    softmax over the k keys, values and the residual add as batched products in this
    layout); elsewhere it is x + eca_attention(x^T, ...)^T, with that op's own dispatch."""
    check_tensor(x, "x", ndim=3)
    r = x.transpose(1, 2)
    _validate(r, protos, wq, wk, wv, value_width=x.shape[1], r_name="x", value_bias=value_bias)  # Z: x's width
    if x.device.type == "cpu" and _backend.forced_backend() in (None, "ext") \
            and x.dtype in (torch.float32, torch.float64) and _backend.ext_status(RESIDUAL_OP, "cpu") is None:
        return torch.ops.omnifm.eca_residual(x, protos, wq, wk, wv, value_bias)
    return x + _dispatched(r, protos, wq, wk, wv, value_bias).transpose(1, 2)


def eca_psp_ref(r, protos, wq, wk, wv, out_weight, suffix):
    """PyTorch reference of eca_psp: [ECA(r) out_weight^T | r | suffix]."""
    z = eca_attention_ref(r, protos, wq, wk, wv) @ out_weight.transpose(0, 1)
    return torch.cat([z, r, suffix.expand(r.shape[0], -1, -1)], dim=1)


def eca_psp(r, protos, wq, wk, wv, out_weight, suffix):
    """[Z out_weight^T | r | suffix] (B, 2L + p, d) for tokens r (B, L, d), Z =
    eca_attention(r, protos, wq, wk, wv) (B, L, dh), out_weight (d, dh), suffix (p, d)
    broadcast over the batch: the adapter's sequence mode with PSP (prefix Z, the
    tokens, p suffix prompts). Output: r's dtype, contiguous.

    On CPU with the extension this is one compiled call each way (the values are mapped
    on the k prototype rows, (protos Wv) out_weight^T; the prefix, tokens and prompts
    are written into one output; one autograd node); elsewhere eca_attention with
    Wv out_weight^T as its values, then a concatenation."""
    _validate(r, protos, wq, wk, wv)
    check_tensor(out_weight, "out_weight", shape=(r.shape[2], wq.shape[1]))
    check_tensor(suffix, "suffix", shape=(None, r.shape[2]))
    check_same_device(r=r, out_weight=out_weight, suffix=suffix)
    check_same_dtype(r=r, out_weight=out_weight, suffix=suffix)
    if r.device.type == "cpu" and _backend.forced_backend() in (None, "ext") \
            and r.dtype in (torch.float32, torch.float64) and _backend.ext_status(PSP_OP, "cpu") is None:
        return torch.ops.omnifm.eca_psp(r, protos, wq, wk, wv, out_weight, suffix)
    z = _dispatched(r, protos, wq, wk, wv @ out_weight.transpose(0, 1), None)
    return torch.cat([z, r, suffix.expand(r.shape[0], -1, -1)], dim=1)


# --- registration: the core op of each fused backend, its fake and its backward.

@torch.library.custom_op("omnifm::eca_core_triton", mutates_args=())
def _eca_core_triton(r: torch.Tensor, at: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
    from .triton.eca_attention import eca_core_triton

    return eca_core_triton(r, at, vp)


@torch.library.custom_op("omnifm::eca_core_backward_triton", mutates_args=())
def _eca_core_backward_triton(grad: torch.Tensor, r: torch.Tensor, at: torch.Tensor,
                              vp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.eca_attention import eca_core_backward_triton

    return eca_core_backward_triton(grad, r, at, vp)


def _fake(r, at, vp):
    return r.new_empty(r.shape[0], r.shape[1], vp.shape[2])


def _fake_backward(grad, r, at, vp):
    return torch.empty_like(r), torch.empty_like(at), torch.empty_like(vp)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_backward(backward_op):
    def backward(ctx, grad):
        r, at, vp = ctx.saved_tensors
        return backward_op(grad.contiguous(), r, at, vp)

    return backward


def _register(name, backward_name, autograd=True):
    torch.library.register_fake(f"omnifm::{name}")(_fake)
    torch.library.register_fake(f"omnifm::{backward_name}")(_fake_backward)
    if autograd:
        backward_op = getattr(torch.ops.omnifm, backward_name)
        torch.library.register_autograd(f"omnifm::{name}", _make_backward(backward_op), setup_context=_setup_context)


_register("eca_core_triton", "eca_core_backward_triton")
if _backend.ext_status(OP, "cpu") is None:
    _register("eca_core", "eca_core_backward", autograd=False)  # its autograd is C++'s (eca_attention_kernel.cpp)


def _fake_residual(x, protos, wq, wk, wv, value_bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_residual_backward(grad, x, protos, wq, wk, wv, value_bias):
    g_bias = x.new_empty(0) if value_bias is None else torch.empty_like(value_bias)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(protos),
            torch.empty_like(wq), torch.empty_like(wk), torch.empty_like(wv), g_bias)


if _backend.ext_status(RESIDUAL_OP, "cpu") is None:  # its autograd is registered in C++ (eca_attention_kernel.cpp)
    torch.library.register_fake("omnifm::eca_residual")(_fake_residual)
    torch.library.register_fake("omnifm::eca_residual_backward")(_fake_residual_backward)


def _fake_psp(r, protos, wq, wk, wv, out_weight, suffix):
    return r.new_empty(r.shape[0], 2 * r.shape[1] + suffix.shape[0], r.shape[2])


def _fake_psp_backward(grad, r, protos, wq, wk, wv, out_weight, suffix):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (r, protos, wq, wk, wv, out_weight, suffix))


if _backend.ext_status(PSP_OP, "cpu") is None:  # its autograd is registered in C++ (eca_attention_kernel.cpp)
    torch.library.register_fake("omnifm::eca_psp")(_fake_psp)
    torch.library.register_fake("omnifm::eca_psp_backward")(_fake_psp_backward)
