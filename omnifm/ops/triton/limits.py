"""Shape limits of the Triton kernels, importable without triton (the dispatcher
reads them to decide whether Triton can take a call)."""
TOPK_MAX_K = 128  # running top-k kept per query in registers
SPECTRAL_FUSED_MAX_SIZE = 16  # larger windows: lowpass kernel + PyTorch head
