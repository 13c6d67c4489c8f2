"""Per-call backend choice.

Each op lists, per backend, a function that returns None when that backend can run
the given inputs, or the reason it cannot. The first usable backend in the priority
list wins; the reasons for skipping the others are kept for ``backend_info()``.
``OMNIFM_BACKEND=reference|triton|ext`` forces one; forcing one that cannot run raises.
"""
import functools
import importlib.util
import os
from dataclasses import dataclass, field

import torch

import omnifm_ext

BACKENDS = ("triton", "ext", "reference")
PRIORITY = {"cuda": ("triton", "ext", "reference"), "cpu": ("ext", "reference", "triton")}


class BackendUnavailableError(RuntimeError):
    """A forced backend (OMNIFM_BACKEND) cannot run this call."""


@dataclass
class Choice:
    backend: str
    skipped: dict = field(default_factory=dict)  # backend -> why it was not used


def forced_backend():
    name = os.environ.get("OMNIFM_BACKEND", "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"OMNIFM_BACKEND: expected one of {BACKENDS} or 'auto', got {name!r}")
    return name


# Facts fixed for the process, looked up once: torch.compile traces the per-call
# checks, and neither the dispatcher query nor an import is traceable.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _has_kernel(op, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"omnifm::{op}", key)
    except RuntimeError:  # no schema: the extension does not define this op
        return False


def has_ext_kernel(op, device_type):
    """Whether omnifm_ext registered omnifm::<op> for this device type."""
    return (op, device_type) in EXT_KERNELS


def _ext_kernels():
    """{(op, device_type)} for which omnifm_ext registered a kernel."""
    if not omnifm_ext.AVAILABLE:
        return frozenset()
    ops = ("lowpass_spectrum", "spectral_token", "cosine_topk", "cosine_topk_screened", "eca_core", "eca_residual",
           "eca_psp", "spalign_loss")
    return frozenset((op, key.lower()) for op in ops for key in ("CPU", "CUDA") if _has_kernel(op, key))


EXT_KERNELS = _ext_kernels()


def triton_status(device_type):
    """None if Triton kernels can run on this device type, else why not."""
    if not TRITON_INSTALLED:
        return "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        if interpret:
            return "TRITON_INTERPRET=1 runs kernels on the CPU only"
        if not torch.cuda.is_available():
            return "no CUDA device available"
        return None
    if device_type == "cpu":
        return None if interpret else "CPU tensors run Triton only under TRITON_INTERPRET=1"
    return f"no Triton support for {device_type} tensors"


def ext_status(op_name, device_type):
    """None if omnifm_ext has a kernel for this op on this device type, else why not."""
    if not omnifm_ext.AVAILABLE:
        return f"omnifm_ext not loaded ({omnifm_ext.LOAD_ERROR})"
    if (op_name, device_type) not in EXT_KERNELS:
        return f"omnifm_ext has no {device_type} kernel for {op_name}"
    return None


def choose(checks, device_type, explain=False):
    """checks: {backend: callable() -> None | reason}. Returns a Choice. The checks after
    the first usable backend run only with explain=True (backend_info() reports why
    each backend was or was not used; an op's call needs only the backend)."""
    forced = forced_backend()
    if forced is not None:
        reason = checks[forced]()
        if reason is not None:
            raise BackendUnavailableError(f"OMNIFM_BACKEND={forced} cannot run this call: {reason}")
        return Choice(forced, {b: "OMNIFM_BACKEND forces " + forced for b in BACKENDS if b != forced})
    skipped, chosen = {}, None
    for name in PRIORITY.get(device_type, ("reference",)):
        if chosen is not None and not explain:
            break
        reason = checks[name]()
        if chosen is None and reason is None:
            chosen = name
        elif reason is None:
            skipped[name] = f"usable, but {chosen} comes first for {device_type} tensors"
        else:
            skipped[name] = reason
    if chosen is not None:
        return Choice(chosen, skipped)
    raise BackendUnavailableError(f"no backend can run this call: {skipped}")


def backend_for(checks_of, device_type, *facts):
    """choose(checks_of(device_type, *facts), device_type).backend, remembered for CPU
    calls that OMNIFM_BACKEND does not force: there the answer depends on the facts alone
    (the extension's kernels are fixed for the process; the reference always runs), and
    a training step, which calls each op once, finds the checks' Python code cold: run
    afresh, they cost more than a small op's kernel. facts: hashable."""
    if device_type == "cpu" and forced_backend() is None:
        return _cpu_choice(checks_of, facts)
    return choose(checks_of(device_type, *facts), device_type).backend


@functools.lru_cache(maxsize=1024)
def _cpu_choice(checks_of, facts):
    return choose(checks_of("cpu", *facts), "cpu").backend


def register_fake_and_autograd(op, fake, backward, setup_context, ext_autograd=True):
    """Fake kernel and autograd for omnifm::<op>_triton and, when omnifm_ext defines
    it, for the compiled omnifm::<op> (fakes only where the extension loaded); with
    ext_autograd=False the compiled op gets only its fake (its autograd is C++'s)."""
    torch.library.register_fake(f"omnifm::{op}_triton")(fake)
    torch.library.register_autograd(f"omnifm::{op}_triton", backward, setup_context=setup_context)
    if (op, "cpu") in EXT_KERNELS:
        torch.library.register_fake(f"omnifm::{op}")(fake)
        if ext_autograd:
            torch.library.register_autograd(f"omnifm::{op}", backward, setup_context=setup_context)
