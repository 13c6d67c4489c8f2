import os
import shutil

# Triton reads TRITON_INTERPRET at import: without a GPU, run its kernels on the CPU.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernels allocate their outputs as NaN, so an unwritten element cannot pass.
os.environ["OMNIFM_POISON_OUTPUTS"] = "1"
os.environ.pop("OMNIFM_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("omnifm", deadline=None, print_blob=True)
settings.load_profile("omnifm")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
