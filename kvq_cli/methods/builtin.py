"""Imports every built-in method module so that each registers itself."""

from . import coupled, fp16, kivi, kvquant, product, rotated, turbo, uniform  # noqa: F401
