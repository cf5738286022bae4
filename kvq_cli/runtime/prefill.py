"""Chunked prefill: a chunk of queries against the packed history plus the chunk itself in full precision.

The history ``[0, P)`` is dequantized one block at a time (never a whole layer); each block is attended
with a fused attention that also returns the log-sum-exp of its scores, and the partial results are merged:

    lse = logaddexp(lse_1, lse_2),  out = out_1 exp(lse_1 - lse) + out_2 exp(lse_2 - lse).

The chunk's own keys and values (post-RoPE, as the model computed them) are the last block, causal.
``lse_attention`` is the fused attention: FlashAttention (``aten._scaled_dot_product_flash_attention``) on
CUDA for fp16/bf16 queries, else a readable PyTorch version (the reference, used on the CPU and in tests).
``KVQLayer.attend`` also has a pure reference for the same semantics (``blockwise_attention`` with the chunk
as its last blocks); tests check the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..blocks import BLOCK_ELEMENTS, history_block  # noqa: F401 (re-exported: the runtime's block sizes)


def flash_available(query: Tensor) -> bool:
    """FlashAttention with log-sum-exp: CUDA, fp16/bf16, head_dim a multiple of 8 up to 256."""
    d = query.shape[-1]
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256


def lse_attention_ref(q: Tensor, k: Tensor, v: Tensor, scaling: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Reference: softmax attention of ``q (B, Hq, Tq, D)`` over ``k, v (B, Hkv, L, D)`` (GQA: query head ``i``
    reads KV head ``i // G``); ``causal`` needs ``Tq == L``. Returns float32 ``out (B, Hq, Tq, D)`` and
    ``lse (B, Hq, Tq)``, the natural log-sum-exp of the scaled scores."""
    b, hq, tq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qf = q.float().reshape(b, hkv, hq // hkv, tq, d)  # (B, Hkv, G, Tq, D)
    s = torch.einsum("bhgtd,bhld->bhgtl", qf, k.float()) * scaling  # (B, Hkv, G, Tq, L)
    if causal:
        future = torch.arange(length, device=q.device)[None, :] > torch.arange(tq, device=q.device)[:, None]
        s = s.masked_fill(future, -math.inf)
    lse = torch.logsumexp(s, -1)  # (B, Hkv, G, Tq)
    out = torch.einsum("bhgtl,bhld->bhgtd", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(b, hq, tq, d), lse.reshape(b, hq, tq)


def lse_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float, causal: bool) -> tuple[Tensor, Tensor]:
    """``lse_attention_ref`` through FlashAttention where ``flash_available`` (K/V cast to the query's dtype
    and repeated to the query heads), else the reference."""
    if not flash_available(q):
        return lse_attention_ref(q, k, v, scaling, causal)
    g = q.shape[1] // k.shape[1]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)[:2]
    return out.float(), lse.float()


def merge(acc: tuple[Tensor, Tensor] | None, part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions ``(out (B, Hq, Tq, D), lse (B, Hq, Tq))`` over disjoint key sets."""
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None], lse


def chunked_prefill(query: Tensor, read: Callable[[int, int], tuple[Tensor, Tensor]], bounds: list[tuple[int, int]],
                    chunk_k: Tensor, chunk_v: Tensor, scaling: float,
                    attend: Callable[..., tuple[Tensor, Tensor]] = lse_attention) -> Tensor:
    """Attention of the chunk's ``query (B, Hq, Tq, D)`` over history blocks ``bounds`` (``read(a, b)`` ->
    post-RoPE keys and values ``(B, Hkv, b - a, D)``) and, causally, over ``chunk_k, chunk_v (B, Hkv, Tq, D)``.

    Returns float32 ``(B, Hq, Tq, D)``."""
    acc = None
    for a, e in bounds:
        k, v = read(a, e)
        acc = merge(acc, attend(query, k, v, scaling, False))
    acc = merge(acc, attend(query, chunk_k, chunk_v, scaling, True))
    return acc[0]
