"""omnifm.nn: the OmniFM modules built on omnifm.ops."""
from .spectral_tokenizer import SpectralTokenizer

__all__ = ["SpectralTokenizer"]
