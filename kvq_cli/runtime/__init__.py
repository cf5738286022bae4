"""The runtime: a bit-packed quantized KV cache usable from transformers (``load_cache`` -> ``KVQCache``)."""

from .cache import KVQCache, KVQLayer, load_cache

__all__ = ["KVQCache", "KVQLayer", "load_cache"]
