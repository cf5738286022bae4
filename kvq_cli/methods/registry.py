"""Registry of KV quantization methods: ``@register`` on a ``KVMethod`` dataclass."""

from __future__ import annotations

import dataclasses
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


def make_method(name: str, **options: Any) -> KVMethod:
    """Build and validate a method from its name and options (unknown options are refused)."""
    cls = get_method_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in options.items() if k not in known and v is not None)
    if unknown:
        raise KvqError(f"method {name} does not take option(s): {', '.join(unknown)}")
    method = cls(**{k: v for k, v in options.items() if k in known and v is not None})
    method.validate()
    return method


def method_from_config(config: dict[str, Any]) -> KVMethod:
    """Inverse of ``KVMethod.config()``."""
    cfg = dict(config)
    name = cfg.pop("method", None)
    if name is None:
        raise KvqError("configuration has no 'method'")
    return make_method(name, **cfg)


def _load_builtin() -> None:
    # Importing the package registers the built-in methods.
    from . import builtin  # noqa: F401


def parse_spec(spec: str, defaults: dict[str, Any] | None = None) -> KVMethod:
    """Build a method from ``NAME``, ``NAME<bits>`` (``kivi2``, ``int4``) or ``NAME:key=value,...``.

    ``defaults`` (e.g. the CLI's ``--bits``) fill options the spec does not set, where the method has them.
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    stripped = name.rstrip("0123456789")
    if stripped != name and stripped in available():
        name, options["bits"] = stripped, int(name[len(stripped):])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise KvqError(f"method option {item!r} in {spec!r} is not key=value")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    cls = get_method_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in (defaults or {}).items():
        if value is not None and key in known:
            options.setdefault(key, value)
    return make_method(name, **options)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(text.rstrip("%")) / (100 if text.endswith("%") else 1) if kind is float else kind(text)
        except ValueError:
            continue
    return text
