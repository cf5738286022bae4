"""kvq: calibrate, evaluate and run quantized KV caches."""

__version__ = "0.1.0"
