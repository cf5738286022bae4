"""kvq: calibrate, evaluate and run quantized KV caches."""

__version__ = "0.1.0"


def __getattr__(name: str):  # the runtime's public entry, loaded on first use (keeps `kvq --help` fast)
    if name in ("load_cache", "KVQCache"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'kvq_cli' has no attribute {name!r}")
