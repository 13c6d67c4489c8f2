"""Input validation shared by the ops. Every error names the offending argument and
is raised before any kernel runs, whatever the backend."""
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name, ndim=None, shape=None):
    """A floating-point tensor of the given rank (and shape, where an entry may be None)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def check_int(value, name, low, high=None):
    """An int in [low, high] (bool is refused: size=True is a bug, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be in {bound}, got {value}")


def check_same_device(**tensors):
    """All tensors on one device; the message names the first that is not."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: on {t.device}, but {first_name} is on {first.device}")


def check_same_dtype(**tensors):
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from {first_name} ({first.dtype})")


def check_image(x, size):
    """x (B, C, H, W) and a window size in [1, min(H, W)]."""
    check_tensor(x, "x", ndim=4)
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"x: H and W must be at least 1, got shape {tuple(x.shape)}")
    check_int(size, "size", 1, min(x.shape[-2:]))


def compute_dtype(dtype):
    """Half types are computed in float32 (FFTs and accumulation need it)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def as_dtype(t, dtype):
    """t in dtype; t itself when it already is (ops called once per training step skip
    the call: every torch call there costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


def new_output(shape, dtype, device):
    """Output buffer of a kernel. With OMNIFM_POISON_OUTPUTS=1 (set by the tests) it
    starts as NaN, so an element the kernel forgets to write shows."""
    if os.environ.get("OMNIFM_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
