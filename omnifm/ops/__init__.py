"""omnifm.ops: drop-in functional ops with fused backends.

Each op dispatches per call: CUDA tensors to Triton, CPU tensors to the compiled
extension omnifm_ext, else the PyTorch reference; OMNIFM_BACKEND forces one.
"""
from ._backend import BackendUnavailableError
from .cosine_topk import PreparedBank, cosine_topk, cosine_topk_ref, prepare_bank
from .eca_attention import eca_attention, eca_attention_ref, eca_psp, eca_psp_ref, eca_residual, eca_residual_ref
from .info import backend_info
from .lowpass_spectrum import lowpass_spectrum, lowpass_spectrum_ref
from .spalign_loss import spalign_loss, spalign_loss_ref
from .spectral_token import spectral_token, spectral_token_ref

__all__ = [
    "BackendUnavailableError",
    "backend_info",
    "cosine_topk",
    "cosine_topk_ref",
    "prepare_bank",
    "PreparedBank",
    "eca_attention",
    "eca_attention_ref",
    "eca_psp",
    "eca_psp_ref",
    "eca_residual",
    "eca_residual_ref",
    "lowpass_spectrum",
    "lowpass_spectrum_ref",
    "spectral_token",
    "spectral_token_ref",
    "spalign_loss",
    "spalign_loss_ref",
]
