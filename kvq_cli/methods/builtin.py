"""Imports every built-in method module so that each registers itself."""

from . import fp16  # noqa: F401
