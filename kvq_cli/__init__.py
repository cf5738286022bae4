"""kvq: calibrate, evaluate and run quantized KV caches."""

__version__ = "0.1.0"

from .runtime import KVQCache, load_cache  # noqa: E402,F401 - the runtime's public entry
