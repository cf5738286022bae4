"""Imports every built-in method module so that each registers itself."""

from . import coupled, fp16, kivi, kvquant, product, turbo, uniform  # noqa: F401
