"""KV quantization methods: one file each, behind ``KVMethod`` and a registry."""

from .base import KVMethod, LayerCalibration
from .registry import available, get_method_class, make_method, method_from_config, parse_spec, register

__all__ = [
    "KVMethod",
    "LayerCalibration",
    "available",
    "get_method_class",
    "make_method",
    "method_from_config",
    "parse_spec",
    "register",
]
