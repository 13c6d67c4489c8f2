"""omnifm.nn: the OmniFM modules built on omnifm.ops."""
from .adapter import FiLM, OmniFMAdapter
from .eca_fusion import ECAFusion
from .spectral_tokenizer import SpectralTokenizer

__all__ = ["ECAFusion", "FiLM", "OmniFMAdapter", "SpectralTokenizer"]
