"""spalign_loss: the SPAlign term of OmniFM.

    spalign_loss(s, protos) -> scalar = mean over the batch of ||s - mean_k protos||^2

s (B, d) spectral tokens, protos (B, k, d) the retrieved prototypes. PyTorch's fused
mse_loss (summed) already is the kernel: one op and one autograd node for the
difference, square and sums (a training step calls this once, and each extra call
there costs more than the arithmetic), so this op has no kernel of its own.
"""
import torch
import torch.nn.functional as F

from ._checks import as_dtype, check_same_device, check_tensor


def spalign_loss(s, protos):
    check_tensor(s, "s", ndim=2)
    check_tensor(protos, "protos", ndim=3)
    if s.shape[0] < 1:
        raise ValueError("s: the batch is empty")
    if protos.shape[0] != s.shape[0] or protos.shape[2] != s.shape[1] or protos.shape[1] < 1:
        raise ValueError(f"protos: expected (B={s.shape[0]}, k>=1, d={s.shape[1]}), got {tuple(protos.shape)}")
    check_same_device(s=s, protos=protos)
    dtype = torch.promote_types(s.dtype, protos.dtype)
    return F.mse_loss(as_dtype(s, dtype), as_dtype(protos.mean(1), dtype), reduction="sum") / s.shape[0]
