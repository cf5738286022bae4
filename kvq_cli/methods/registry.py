"""Registry of KV quantization methods: ``@register`` on a ``KVMethod`` dataclass."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from ..errors import KvqError
from .base import KVMethod

_METHODS: dict[str, type[KVMethod]] = {}


def register(cls: type[KVMethod]) -> type[KVMethod]:
    """Class decorator: make a method available by ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of every registered method."""
    _load_builtin()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[KVMethod]:
    """The class registered as ``name``; ``KvqError`` listing the known ones otherwise."""
    _load_builtin()
    if name not in _METHODS:
        raise KvqError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


#: Inclusive bounds of the options every method shares the name of (bits are checked by each method).
BOUNDS: dict[str, tuple[float, float]] = {
    "sink": (0, 1 << 20), "residual": (0, 1 << 20), "group": (1, 1024), "kmeans_iters": (1, 10_000),
    "seed": (0, 2**32 - 1), "max_samples": (1, 1 << 24), "channels": (1, 256), "subspaces": (0, 4096),
    "bits": (1, 16), "outliers": (0.0, 0.1), "value_bits": (0, 16),
}
#: Longest text option (kvquant's ``layer_bits``: two digits and a dash per layer).
MAX_TEXT = 3 * 4096


def _field_types(cls: type[KVMethod]) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_option(name: str, key: str, value: Any, kind: type) -> Any:
    """``value`` as an option ``key`` of method ``name`` of type ``kind`` (bool, int, float or str) within
    ``BOUNDS``; ``KvqError`` otherwise. Booleans are never numbers, floats never ints, and numbers are finite."""
    where = f"method {name} option {key}"
    if kind is str:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise KvqError(f"{where} is a text of at most {MAX_TEXT} characters, not {str(value)[:40]!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise KvqError(f"{where} is true or false, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise KvqError(f"{where} is {'an integer' if kind is int else 'a number'}, not {value!r}")
    if not math.isfinite(value):
        raise KvqError(f"{where} is a finite number, not {value!r}")
    lo, hi = BOUNDS.get(key, (-math.inf, math.inf))
    if not lo <= value <= hi:
        raise KvqError(f"{where} is in [{lo:,}, {hi:,}], not {value!r}")
    return float(value) if kind is float else value


def make_method(name: str, **options: Any) -> KVMethod:
    """Build and validate a method from its name and options: unknown options, wrong types and values out of
    ``BOUNDS`` are refused (``KvqError``); ``None`` means the default."""
    cls = get_method_class(name)
    types = _field_types(cls)
    unknown = sorted(k for k, v in options.items() if k not in types and v is not None)
    if unknown:
        raise KvqError(f"method {name} does not take option(s): {', '.join(unknown)}")
    typed = {k: check_option(name, k, v, types[k]) for k, v in options.items() if v is not None}
    method = cls(**typed)
    method.validate()
    return method


def method_from_config(config: dict[str, Any]) -> KVMethod:
    """Inverse of ``KVMethod.config()``."""
    if not isinstance(config, dict):
        raise KvqError("configuration is not a JSON object")
    cfg = dict(config)
    name = cfg.pop("method", None)
    if not isinstance(name, str):
        raise KvqError("configuration has no 'method' name")
    if any(v is None for v in cfg.values()):
        raise KvqError(f"configuration of {name} has null options")
    return make_method(name, **cfg)


def _load_builtin() -> None:
    # Importing the package registers the built-in methods.
    from . import builtin  # noqa: F401


def parse_spec(spec: str, defaults: dict[str, Any] | None = None) -> KVMethod:
    """Build a method from ``NAME``, ``NAME<bits>`` (``kivi2``, ``int4``) or ``NAME:key=value,...``.

    Values are read as the option's type (``true/false/yes/no/on/off`` for switches, integers for counts, numbers
    or ``1%`` for fractions); an option given twice is refused. ``defaults`` (e.g. the CLI's ``--bits``) fill
    options the spec does not set, where the method has them.
    """
    name, _, rest = spec.strip().partition(":")
    raw: dict[str, str] = {}
    stripped = name.rstrip("0123456789")
    if stripped != name and stripped in available():
        name, raw["bits"] = stripped, name[len(stripped):]
    types = _field_types(get_method_class(name))
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise KvqError(f"method option {item!r} in {spec!r} is not key=value")
        if key in raw:
            raise KvqError(f"method option {key} is given twice in {spec!r}")
        raw[key] = value.strip()
    unknown = sorted(k for k in raw if k not in types)
    if unknown:
        raise KvqError(f"method {name} does not take option(s): {', '.join(unknown)}")
    options: dict[str, Any] = {k: _parse_value(name, k, v, types[k]) for k, v in raw.items()}
    for key, value in (defaults or {}).items():
        if value is not None and key in types:
            options.setdefault(key, value)
    return make_method(name, **options)


def parse_fraction(text: str) -> float:
    """A fraction as users write it: ``0.01`` or ``1%`` (``ValueError`` otherwise)."""
    low = text.strip().lower()
    return float(low[:-1]) / 100 if low.endswith("%") else float(low)


def _parse_value(name: str, key: str, text: str, kind: type) -> Any:
    """The text of option ``key`` as its ``kind``: ``KvqError`` when it is not one."""
    low = text.lower()
    if kind is bool and low in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return low in ("true", "yes", "on", "1")
    if kind is str:
        return text
    try:
        if kind is int and low.lstrip("+-").isdigit() and len(low) <= 20:
            return int(low)
        if kind is float:
            return parse_fraction(low)
    except ValueError:
        pass
    what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, str(kind))
    raise KvqError(f"method {name} option {key} is {what}, not {text!r}")
