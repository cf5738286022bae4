"""Imports every built-in method module so that each registers itself."""

from . import coupled, fp16, kivi, kvquant, product, uniform  # noqa: F401
