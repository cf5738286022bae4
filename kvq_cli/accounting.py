"""Bit accounting: the one formula for what a quantized KV cache holds (used by calibrate, eval-ppl, generate,
estimate-memory and the runtime cache).

Average bits per element = every bit the cache holds for K and V (codes, scales, zero points,
outliers and their row pointers, per-layer codebooks and thresholds, full-precision sink and residual tokens)
divided by the number of K and V elements, at a stated context length. Per-layer state and the 16-bit sink are
fixed costs, so the average falls as the context grows: every command says at which context it counts
(``describe``). Simulated evaluation quantizes every token (no residual window) and says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hf_config import KVGeometry
    from .methods.base import KVMethod

FP16_TOKEN_BITS_PER_ELEMENT = 16


def full_precision_tokens(method: KVMethod, tokens: int, with_residual: bool = True) -> int:
    """How many of ``tokens`` the cache keeps in 16 bits (sink, plus the residual window at run time)."""
    return min(tokens, method.sink + (method.residual if with_residual else 0))


def layer_bits(method: KVMethod, kv_heads: int, head_dim: int, tokens: int, state_bits: int = 0,
               with_residual: bool = True, batch: int = 1) -> float:
    """Bits one layer's cache holds for ``batch`` sequences of ``tokens`` tokens (state counted once)."""
    from .methods.base import outlier_pointer_bits

    fp = full_precision_tokens(method, tokens, with_residual)
    per_seq = fp * 2 * kv_heads * head_dim * FP16_TOKEN_BITS_PER_ELEMENT
    per_seq += (tokens - fp) * method.bits_per_token(kv_heads, head_dim)
    per_seq += method.outlier_streams * outlier_pointer_bits(kv_heads, head_dim, tokens - fp)
    return batch * per_seq + state_bits


def window_layer_bits(window: int, kv_heads: int, head_dim: int, tokens: int, batch: int = 1) -> float:
    """Bits of a sliding-window layer's cache: its last ``window`` tokens' K and V in fp16 (``runtime.window``)."""
    return batch * min(tokens, window) * 2 * kv_heads * head_dim * FP16_TOKEN_BITS_PER_ELEMENT


def cache_bits(method: KVMethod, geom: KVGeometry, tokens: int, state_bits: int = 0,
               with_residual: bool = True, batch: int = 1) -> float:
    """Bits the whole cache holds; ``state_bits`` is the total over layers. Global layers hold every token as the
    method stores it; sliding-window layers (``geom.windows``) their last ``window`` tokens in fp16."""
    windows = geom.windows or (None,) * geom.layers
    per_layer = layer_bits(method, geom.kv_heads, geom.head_dim, tokens, 0, with_residual, batch)
    rings = sum(window_layer_bits(w, geom.kv_heads, geom.head_dim, tokens, batch) for w in windows if w is not None)
    return sum(w is None for w in windows) * per_layer + rings + state_bits


def avg_bits(method: KVMethod, geom: KVGeometry, tokens: int, state_bits: int = 0,
             with_residual: bool = True) -> float:
    """Average bits per K/V element at a context of ``tokens`` tokens."""
    elements = geom.layers * 2 * geom.kv_heads * geom.head_dim * tokens
    return cache_bits(method, geom, tokens, state_bits, with_residual) / elements


def describe(tokens: int, with_residual: bool = True) -> str:
    """One line saying what ``avg_bits`` counts and at which context, for every command's output."""
    window = ("the 16-bit sink and residual window" if with_residual
              else "the 16-bit sink; no residual window (simulated: every other token quantized)")
    return (f"avg bits = every bit the K/V cache holds (codes, scales, zero points, outliers and their pointers, "
            f"per-layer codebooks, {window}) / K and V elements, at {tokens:,} tokens")
