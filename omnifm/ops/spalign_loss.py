"""spalign_loss: the SPAlign term of OmniFM.

    spalign_loss(s, protos) -> scalar = mean over the batch of ||s - mean_k protos||^2

s (B, d) spectral tokens, protos (B, k, d) the retrieved prototypes; the result has the
promotion of their dtypes, and gradients flow to both. On CPU with the extension
(float32, float64) it is one compiled call each way with one autograd node: a training
step calls it once, and there the PyTorch form (mean, mse_loss, a division, and three
backward nodes) costs more in calls than in arithmetic. Elsewhere it is the reference,
PyTorch's fused mse_loss (summed) divided by B.
"""
import torch
import torch.nn.functional as F

from . import _backend
from ._checks import as_dtype, check_same_device, check_tensor

OP = "spalign_loss"


def spalign_loss_ref(s, protos):
    """PyTorch reference (the contract), in the promoted dtype."""
    dtype = torch.promote_types(s.dtype, protos.dtype)
    return F.mse_loss(as_dtype(s, dtype), as_dtype(protos.mean(1), dtype), reduction="sum") / s.shape[0]


def _validate(s, protos):
    check_tensor(s, "s", ndim=2)
    check_tensor(protos, "protos", ndim=3)
    if s.shape[0] < 1:
        raise ValueError("s: the batch is empty")
    if protos.shape[0] != s.shape[0] or protos.shape[2] != s.shape[1] or protos.shape[1] < 1:
        raise ValueError(f"protos: expected (B={s.shape[0]}, k>=1, d={s.shape[1]}), got {tuple(protos.shape)}")
    check_same_device(s=s, protos=protos)


def spalign_loss(s, protos):
    """Mean over the batch of ||s_b - mean_k protos_bk||^2 (see module doc)."""
    _validate(s, protos)
    dtype = torch.promote_types(s.dtype, protos.dtype)
    if s.device.type == "cpu" and _backend.forced_backend() in (None, "ext") \
            and dtype in (torch.float32, torch.float64) and _backend.ext_status(OP, "cpu") is None:
        return torch.ops.omnifm.spalign_loss(as_dtype(s, dtype), as_dtype(protos, dtype))
    return spalign_loss_ref(s, protos)


# --- registration: fakes for torch.compile (the autograd is C++'s, spalign_loss_kernel.cpp).

def _fake(s, protos):
    return s.new_empty(())


def _fake_backward(grad, s, protos):
    return torch.empty_like(s), torch.empty_like(protos)


if _backend.ext_status(OP, "cpu") is None:
    torch.library.register_fake("omnifm::spalign_loss")(_fake)
    torch.library.register_fake("omnifm::spalign_loss_backward")(_fake_backward)
