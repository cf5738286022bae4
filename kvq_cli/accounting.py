"""Bit accounting: the one formula for what a quantized KV cache holds (used by eval, runtime, estimates).

Average bits per element = every bit the cache holds for K and V (codes, scales, zero points,
outliers and their row pointers, per-layer codebooks and thresholds, full-precision sink and residual tokens)
divided by the number of K and V elements, at a stated context length.
"""

from __future__ import annotations

from .hf_attention import KVGeometry
from .methods.base import KVMethod, outlier_pointer_bits

FP16_TOKEN_BITS_PER_ELEMENT = 16


def full_precision_tokens(method: KVMethod, tokens: int, with_residual: bool = True) -> int:
    """How many of ``tokens`` the cache keeps in 16 bits (sink, plus the residual window at run time)."""
    return min(tokens, method.sink + (method.residual if with_residual else 0))


def layer_bits(method: KVMethod, kv_heads: int, head_dim: int, tokens: int, state_bits: int = 0,
               with_residual: bool = True, batch: int = 1) -> float:
    """Bits one layer's cache holds for ``batch`` sequences of ``tokens`` tokens (state counted once)."""
    fp = full_precision_tokens(method, tokens, with_residual)
    per_seq = fp * 2 * kv_heads * head_dim * FP16_TOKEN_BITS_PER_ELEMENT
    per_seq += (tokens - fp) * method.bits_per_token(kv_heads, head_dim)
    per_seq += method.outlier_streams * outlier_pointer_bits(kv_heads, head_dim, tokens - fp)
    return batch * per_seq + state_bits


def cache_bits(method: KVMethod, geom: KVGeometry, tokens: int, state_bits: int = 0,
               with_residual: bool = True, batch: int = 1) -> float:
    """Bits the whole cache holds; ``state_bits`` is the total over layers."""
    per_layer = layer_bits(method, geom.kv_heads, geom.head_dim, tokens, 0, with_residual, batch)
    return geom.layers * per_layer + state_bits


def avg_bits(method: KVMethod, geom: KVGeometry, tokens: int, state_bits: int = 0,
             with_residual: bool = True) -> float:
    """Average bits per K/V element at a context of ``tokens`` tokens."""
    elements = geom.layers * 2 * geom.kv_heads * geom.head_dim * tokens
    return cache_bits(method, geom, tokens, state_bits, with_residual) / elements
