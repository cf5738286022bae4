"""The block sizes the packed cache's prefill and decode work in, as plain integers (no torch): ``estimate-memory``
counts the same blocks the runtime allocates (``runtime.prefill`` imports them from here)."""

from __future__ import annotations

#: Elements of one history block's key tensor repeated to the query heads (B x Hq x L x D): 64 Mi (128 MiB bf16).
BLOCK_ELEMENTS = 1 << 26


def history_block(batch: int, heads: int, head_dim: int, step: int = 1, quarter: bool = False) -> int:
    """Tokens dequantized at once: a power of two in ``[1024, 65536]`` keeping ``B H L D <= BLOCK_ELEMENTS``
    (a quarter of it with ``quarter``: float32 blocks of one decode query), a multiple of ``step`` (KIVI's
    key groups never straddle blocks). ``heads``: query heads (prefill, K/V repeated) or KV heads (decode)."""
    budget = BLOCK_ELEMENTS // 4 if quarter else BLOCK_ELEMENTS
    tokens = max(1024, min(65536, budget // max(1, batch * heads * head_dim)))
    tokens = 1 << (tokens.bit_length() - 1)
    return max(step, tokens - tokens % step)
