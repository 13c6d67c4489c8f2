"""Triton kernels of omnifm. Imported lazily by the ops, so omnifm works without
Triton. On a machine without a GPU they run under TRITON_INTERPRET=1 (set it before
triton is first imported)."""
