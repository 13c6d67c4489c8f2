import os
import sys

import torch

# Triton reads TRITON_INTERPRET at import: without a usable CUDA device (not merely an
# nvidia-smi on the PATH), run its kernels on the CPU. Importing torch does not import
# triton; if something did already, the setting would silently not apply.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
# Kernels allocate their outputs as NaN, so an unwritten element cannot pass.
os.environ["OMNIFM_POISON_OUTPUTS"] = "1"
os.environ.pop("OMNIFM_BACKEND", None)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# "ci" (default): derandomized, so a CI run is reproducible and a red run replays
# exactly. "nightly": fresh random inputs and more of them; run it with a new seed,
#   python -m pytest -q --hypothesis-profile=nightly --hypothesis-seed=$RANDOM
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True, database=None)
settings.register_profile("nightly", deadline=None, print_blob=True, max_examples=200)
settings.load_profile(os.environ.get("OMNIFM_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tensors: a second intra-op thread only adds hand-offs (and spins
    on a busy machine). Modules opt in with pytestmark = pytest.mark.usefixtures(...)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_sessionstart(session):
    """Fail loudly when a backend that should run here cannot: a skipped fast path
    would otherwise turn into a green run that tested nothing."""
    if os.environ.get("OMNIFM_ALLOW_MISSING_BACKENDS") == "1":
        return
    import omnifm_ext
    from omnifm.ops import _backend

    problems = []
    if not omnifm_ext.AVAILABLE:
        problems.append(f"omnifm_ext did not load: {omnifm_ext.LOAD_ERROR}")
    device = "cuda" if HAS_CUDA else "cpu"
    why = _backend.triton_status(device)
    if why is not None:
        problems.append(f"the Triton backend cannot run on {device}: {why}")
    if problems:
        raise pytest.UsageError("; ".join(problems) + " (set OMNIFM_ALLOW_MISSING_BACKENDS=1 to test without them)")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: set OMNIFM_SLOW=1 to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and os.environ.get("OMNIFM_SLOW") != "1":
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
