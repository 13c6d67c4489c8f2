"""spectral_token: the OmniFM spectral anchor of each image, a unit vector.

    spectral_token(x, mix_weight, freq_embed, w1, b1, w2, b2, *, size) -> (B, d)

x (B, C, H, W); S = log1p(lowpass_spectrum(x, size)) viewed as K*K frequency bins
(row-major over the window) with C channel values each. FreqMix:
F = S mix_weight^T + freq_embed, mix_weight (m, C), freq_embed (K*K, m). Then
GELU(F w1^T + b1) with w1 (h, m), GELU(. w2^T + b2) with w2 (d, h), mean over the
bins, L2 normalisation (eps 1e-12, as F.normalize). GELU is the exact (erf) form
(the compiled CPU kernel's float32 head evaluates erf by Abramowitz & Stegun 7.1.26,
|error| <= 1.5e-7). Output dtype: the promotion of x's and the parameters' dtypes.
"""

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import as_dtype, check_image, check_same_device, check_same_dtype, check_tensor, compute_dtype
from ._dft import magnitude_grad, window_dft
from .lowpass_spectrum import lowpass_spectrum_ref

OP = "spectral_token"
EPS = 1e-12
PARAM_NAMES = ("mix_weight", "freq_embed", "w1", "b1", "w2", "b2")


def token_head(s, mix_weight, freq_embed, w1, b1, w2, b2):
    """s (B, C, K, K) log-magnitude window -> (B, d) unit tokens."""
    bins = s.flatten(2).transpose(1, 2)  # (B, K*K, C)
    f = bins @ mix_weight.transpose(0, 1) + freq_embed
    a2 = F.gelu(F.linear(F.gelu(F.linear(f, w1, b1)), w2, b2))
    return F.normalize(a2.mean(1), dim=-1, eps=EPS)


def spectral_token_ref(x, mix_weight, freq_embed, w1, b1, w2, b2, *, size):
    """PyTorch reference (the contract)."""
    out_dtype, cd = _dtypes(x, mix_weight)
    params = [p.to(cd) for p in (mix_weight, freq_embed, w1, b1, w2, b2)]
    s = lowpass_spectrum_ref(x.to(cd), size, log=True)
    return token_head(s, *params).to(out_dtype)


def _dtypes(x, param):
    out_dtype = torch.promote_types(x.dtype, param.dtype)
    return out_dtype, compute_dtype(out_dtype)


def _validate(x, params, size):
    check_image(x, size)
    if x.shape[1] < 1:
        raise ValueError(f"x: needs at least one channel, got shape {tuple(x.shape)}")
    mix_weight, freq_embed, w1, b1, w2, b2 = params
    check_tensor(mix_weight, "mix_weight", shape=(None, x.shape[1]))
    m = mix_weight.shape[0]
    check_tensor(freq_embed, "freq_embed", shape=(size * size, m))
    check_tensor(w1, "w1", shape=(None, m))
    check_tensor(b1, "b1", shape=(w1.shape[0],))
    check_tensor(w2, "w2", shape=(None, w1.shape[0]))
    check_tensor(b2, "b2", shape=(w2.shape[0],))
    for name, n in (("mix_weight", m), ("w1", w1.shape[0]), ("w2", w2.shape[0])):
        if n < 1:
            raise ValueError(f"{name}: output dimension must be at least 1")
    named = dict(zip(PARAM_NAMES, params))
    check_same_device(x=x, **named)
    check_same_dtype(**named)


# CPU crossover (python bench/bench_crossover.py, 2-core VM, 2026-11-30, after the
# float32 head ran on torch's threads and training kept its activations): in float32
# ext beat the reference at every measured size (d = 16, 64, 256; heads up to
# 142,606,336 multiply-adds, B*K*K*h*(m+d); x from 784 elements), forward-only and
# training. The rule: ext where x has at least CPU_EXT_MIN_ELEMENTS elements (B*C*H*W:
# its window DFT against the full FFT; an earlier, conservative measurement, and the
# only allowance float64 gets, whose head runs ATen's calls in ext too) or, below that,
# where a float32 head has at most CPU_EXT_MAX_HEAD_WORK multiply-adds: the largest
# measured, past which nothing was measured.
CPU_EXT_MIN_ELEMENTS = {False: 1605632, True: 2408448}  # {records gradients: elements of x}
CPU_EXT_MAX_HEAD_WORK = {False: 142606336, True: 142606336}  # {records gradients: multiply-adds}


def head_work(batch, size, mix_dim, hidden_dim, dim):
    """Multiply-adds of the per-bin MLP head for one call: B * K*K * h * (m + d)."""
    return batch * size * size * hidden_dim * (mix_dim + dim)


def _ext_check(dev, cd, numel, needs_grad, work):
    why = _backend.ext_status(OP, dev) or (
        None if cd in (torch.float32, torch.float64) else f"ext computes in float32/float64, not {cd}")
    if why is not None or dev != "cpu" or numel is None or _backend.forced_backend() == "ext":
        return why
    floor, ceiling = CPU_EXT_MIN_ELEMENTS[needs_grad], CPU_EXT_MAX_HEAD_WORK[needs_grad]
    if numel < floor and (work is None or work > ceiling):
        head = f"its head's {work} > {ceiling} multiply-adds" if work is not None else \
            "it is not float32 (the head allowance is the float32 loops')"
        return (f"usable, but x has {numel} < {floor} elements and {head}"
                f"{' (recording gradients)' if needs_grad else ''}: the reference is faster there on CPU "
                "(bench/bench_crossover.py)")
    return None


def backend_checks(dev, cd, numel=None, needs_grad=False, work=None):
    """{backend: () -> None | why not} for a device type and compute dtype; numel (x's
    elements, None: large), needs_grad and work (head_work(), None: large) pick between
    ext and the reference on CPU."""
    return {
        "reference": lambda: None,
        "ext": lambda: _ext_check(dev, cd, numel, needs_grad, work),
        "triton": lambda: _backend.triton_status(dev)
        or (None if cd == torch.float32 else "the Triton kernel computes in float32, not float64"),
    }


def spectral_token(x, mix_weight, freq_embed, w1, b1, w2, b2, *, size):
    """Spectral tokens of x (B, C, H, W) -> (B, d) unit vectors (see module doc)."""
    params = (mix_weight, freq_embed, w1, b1, w2, b2)
    _validate(x, params, size)
    out_dtype, cd = _dtypes(x, mix_weight)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    # The head-work allowance was measured for the float32 fused loops (float64 runs ATen's).
    work = head_work(x.shape[0], size, mix_weight.shape[0], w1.shape[0], w2.shape[0]) if cd == torch.float32 else None
    backend = _backend.backend_for(backend_checks, x.device.type, cd, x.numel(), needs_grad, work)
    if backend == "reference":
        return spectral_token_ref(x, *params, size=size)
    params = [as_dtype(p, cd) for p in params]
    if backend == "ext":
        out = torch.ops.omnifm.spectral_token(as_dtype(x, cd), *params, size)
    else:  # triton reads float16/bfloat16/float32 x as is
        out = torch.ops.omnifm.spectral_token_triton(x if x.dtype != torch.float64 else x.to(cd), *params, size)
    return as_dtype(out, out_dtype)


# --- registration: fake kernels and backwards. The Triton op's backward recomputes the
# forward in the matrix form in PyTorch; the compiled op's runs in C++ in one call
# (omnifm::spectral_token_backward, the same math), its autograd too.

@torch.library.custom_op("omnifm::spectral_token_triton", mutates_args=())
def _spectral_token_triton(x: torch.Tensor, mix_weight: torch.Tensor, freq_embed: torch.Tensor,
                           w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                           size: int) -> torch.Tensor:
    from .triton.spectral_token import spectral_token_triton

    return spectral_token_triton(x, mix_weight, freq_embed, w1, b1, w2, b2, size, token_head)


def _fake(x, mix_weight, freq_embed, w1, b1, w2, b2, size):
    return w2.new_empty(x.shape[0], w2.shape[0])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.size = inputs[7]


def _grad_x(ctx, x, g_s):
    """dL/dx from dL/d(log-magnitude window) g_s (B, C, K, K), when x needs it."""
    if not ctx.needs_input_grad[0]:
        return None
    return magnitude_grad(x.to(g_s.dtype), ctx.size, g_s, log=True).to(x.dtype)


def _backward(ctx, grad):
    x, mix_weight, freq_embed, w1, b1, w2, b2 = ctx.saved_tensors
    cd = mix_weight.dtype
    size, kk = ctx.size, ctx.size * ctx.size
    B, C = x.shape[:2]
    # Recompute the forward, keeping the pre-activations; every product is a flat
    # (B*K*K, .) matrix product and GELU's derivative is ATen's fused gelu_backward
    # (element-wise erf/exp chains cost more than the matmuls at these widths).
    X = window_dft(x.to(cd), size)
    mag = X.abs()
    bins = torch.log1p(mag).flatten(2).transpose(1, 2).reshape(B * kk, C)
    f = torch.addmm(freq_embed.repeat(B, 1), bins, mix_weight.t())  # (B*K*K, m)
    h1 = torch.addmm(b1, f, w1.t())
    a1 = F.gelu(h1)
    h2 = torch.addmm(b2, a1, w2.t())
    pooled = F.gelu(h2).view(B, kk, -1).mean(1)
    norm = pooled.norm(dim=-1, keepdim=True)
    token = pooled / norm.clamp_min(EPS)
    g = grad.to(cd)
    # d normalize: (I - t t^T) g / |p| when |p| > eps, g / eps where the clamp is active.
    g_pooled = torch.where(norm > EPS, (g - token * (token * g).sum(-1, keepdim=True)) / norm.clamp_min(EPS), g / EPS)
    g_a2 = (g_pooled / kk).unsqueeze(1).expand(B, kk, -1).reshape(B * kk, -1)
    g_h2 = torch.ops.aten.gelu_backward(g_a2, h2)  # (B*K*K, d)
    g_h1 = torch.ops.aten.gelu_backward(g_h2 @ w2, h1)  # (B*K*K, h)
    g_f = g_h1 @ w1  # (B*K*K, m)
    grads = {
        "w2": g_h2.t() @ a1, "b2": g_h2.sum(0),
        "w1": g_h1.t() @ f, "b1": g_h1.sum(0),
        "mix_weight": g_f.t() @ bins, "freq_embed": g_f.view(B, kk, -1).sum(0),
    }
    g_s = (g_f @ mix_weight).view(B, kk, C).transpose(1, 2).reshape(mag.shape) if ctx.needs_input_grad[0] else None
    return (_grad_x(ctx, x, g_s), *(grads[n] for n in PARAM_NAMES), None)


def _fake_ext_backward(grad, x, mix_weight, freq_embed, w1, b1, w2, b2, size, grad_bins, kept=None):
    g_s = x.new_empty(x.shape[0], x.shape[1], size, size) if grad_bins else x.new_empty(0)
    return (*(torch.empty_like(p) for p in (mix_weight, freq_embed, w1, b1, w2, b2)), g_s)


def kept_numel(batch, channels, mix_dim, hidden_dim, dim, bins):
    """Size of what the compiled float32 training forward keeps for its backward (the
    layout KeptLayout in spectral_token_kernel.cpp): the bins and FreqMix rows, then per
    sample the head's activations at 8-row blocks and 16-column tiles, then the means."""
    rows, hp, dp = -(-bins // 8) * 8, -(-hidden_dim // 16) * 16, -(-dim // 16) * 16
    return batch * (bins * (channels + mix_dim) + rows * (2 * hp + dp) + dim)


def _fake_saving(x, mix_weight, freq_embed, w1, b1, w2, b2, size):
    B, C = x.shape[:2]
    n = kept_numel(B, C, mix_weight.shape[0], w1.shape[0], w2.shape[0], size * size) if x.dtype == torch.float32 else 0
    return _fake(x, mix_weight, freq_embed, w1, b1, w2, b2, size), x.new_empty(n)


# The compiled op's autograd is registered in C++ (spectral_token_kernel.cpp): its
# backward is omnifm::spectral_token_backward, then x's gradient as _grad_x computes it.
_backend.register_fake_and_autograd(OP, _fake, _backward, _setup_context, ext_autograd=False)
if _backend.ext_status(OP, "cpu") is None:
    torch.library.register_fake("omnifm::spectral_token_backward")(_fake_ext_backward)
    torch.library.register_fake("omnifm::spectral_token_saving")(_fake_saving)
