"""omnifm: OmniFM (CVPR 2026) federated learning for medical imaging, with fused ops.

Importing omnifm never fails because the compiled extension is missing: the ops
fall back to their PyTorch reference (see ``omnifm.ops.backend_info()``).
"""
__version__ = "0.1.0"

from . import nn, ops  # noqa: E402,F401
