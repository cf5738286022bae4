"""Imports every built-in method module so that each registers itself."""

from . import fp16, kivi, kvquant, uniform  # noqa: F401
