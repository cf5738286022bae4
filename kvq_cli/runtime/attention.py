"""Attention of new queries over a packed layer cache, one block of keys at a time (online softmax).

The cache's ``update()`` has already appended the current chunk, so the keys are positions ``[0, total)``
(sink, packed history, residual, the chunk itself) and query ``i`` of ``Tq`` sits at position
``total - Tq + i``. Blocks of at most ``block`` tokens are dequantized one at a time and merged with a
running log-sum-exp; no layer's whole K/V ever exists in 16 or 32 bits. GQA/MQA: query head ``i`` reads
KV head ``i // G`` (``G = Hq / Hkv``), as ``repeat_kv``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import KvqError

#: Tokens dequantized at once by the reference path.
DEFAULT_BLOCK = 2048
#: Queries attended at once (a long prefill goes tile by tile: scores are at most QUERY_TILE x block).
QUERY_TILE = 1024

Reader = Callable[[int, int], tuple[Tensor, Tensor]]
"""``read(a, b)`` -> keys (post-RoPE) and values of positions ``[a, b)``, float32 ``(B, Hkv, b - a, D)``."""


class Rope:
    """The model's own rotary embedding (``inv_freq`` and ``attention_scaling`` of its ``rotary_emb``).

    Reads the module's current ``inv_freq`` at every call, so scaled and dynamic variants stay exact.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    @classmethod
    def of(cls, model: nn.Module) -> Rope:
        for name, m in model.named_modules():
            if name.endswith("rotary_emb") and isinstance(getattr(m, "inv_freq", None), Tensor):
                return cls(m)
        raise KvqError(f"{type(model).__name__}: no rotary embedding (rotary_emb.inv_freq) found; pre-RoPE keys "
                       "need one")

    def apply(self, k: Tensor, positions: Tensor) -> Tensor:
        """HF ``apply_rotary_pos_emb`` of float32 keys ``(B, H, L, D)`` at ``positions (L,)``."""
        inv_freq = self.module.inv_freq.to(k.device, torch.float32)  # (D/2,)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, D/2)
        emb = torch.cat([freqs, freqs], -1)  # (L, D)
        scaling = float(getattr(self.module, "attention_scaling", 1.0))
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        half = k.shape[-1] // 2
        rotated = torch.cat([-k[..., half:], k[..., :half]], -1)  # rotate_half
        return k * cos + rotated * sin


def block_bounds(total: int, first: int, block: int) -> list[tuple[int, int]]:
    """``[0, first)`` (the sink, if any), then blocks of ``block`` tokens from ``first`` up to ``total``."""
    bounds = [(0, min(first, total))] if first > 0 else []
    bounds += [(a, min(a + block, total)) for a in range(first, total, block)]
    return [(a, b) for a, b in bounds if b > a]


def blockwise_attention(query: Tensor, read: Reader, total: int, scaling: float, bounds: list[tuple[int, int]]
                        ) -> Tensor:
    """Causal attention of ``query (B, Hq, Tq, D)`` over keys ``[0, total)`` read block by block.

    Returns float32 ``(B, Hq, Tq, D)``.
    """
    b, hq, tq, d = query.shape
    qpos = torch.arange(total - tq, total, device=query.device)  # (Tq,)
    q = None
    m = l = acc = None
    for a, e in bounds:
        k, v = read(a, e)  # (B, Hkv, L, D) each
        if q is None:
            hkv = k.shape[1]
            q = query.float().reshape(b, hkv, hq // hkv, tq, d) * scaling  # (B, Hkv, G, Tq, D)
            m = torch.full((*q.shape[:4], 1), -math.inf, device=query.device)  # running max (B, Hkv, G, Tq, 1)
            l = torch.zeros_like(m)  # running sum of exp
            acc = torch.zeros_like(q)  # running weighted values (B, Hkv, G, Tq, D)
        s = torch.einsum("bhgtd,bhld->bhgtl", q, k)  # (B, Hkv, G, Tq, L)
        if e - 1 > int(qpos[0]):  # the block reaches past the first query: causal mask
            kpos = torch.arange(a, e, device=query.device)
            s = s.masked_fill(kpos[None, :] > qpos[:, None], -math.inf)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - safe)  # (B, Hkv, G, Tq, L)
        alpha = torch.exp(m - safe)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.einsum("bhgtl,bhld->bhgtd", p, v)
        m = m_new
    return (acc / l).reshape(b, hq, tq, d)


def dense_attention(query: Tensor, k: Tensor, v: Tensor, scaling: float) -> Tensor:
    """Reference: causal softmax attention of ``query (B, Hq, Tq, D)`` over full ``k, v (B, Hkv, T, D)``."""
    b, hq, tq, d = query.shape
    hkv, t = k.shape[1], k.shape[2]
    q = query.float().reshape(b, hkv, hq // hkv, tq, d)  # (B, Hkv, G, Tq, D)
    s = torch.einsum("bhgtd,bhld->bhgtl", q, k.float()) * scaling
    causal = torch.arange(t, device=q.device)[None, :] > torch.arange(t - tq, t, device=q.device)[:, None]
    p = torch.softmax(s.masked_fill(causal, -math.inf), -1)
    return torch.einsum("bhgtl,bhld->bhgtd", p, v.float()).reshape(b, hq, tq, d)


def check_causal(mask: Tensor | None, total: int, tq: int) -> None:
    """Refuse masks other than plain causal over ``[0, total)`` (padding, sliding windows)."""
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else mask == 0  # (B, 1, Tq, Tkv)
    allowed = allowed[..., -tq:, :total]
    causal = torch.arange(allowed.shape[-1], device=mask.device)[None, :] <= torch.arange(
        total - tq, total, device=mask.device)[:, None]  # (Tq, Tkv)
    if allowed.shape[-1] != total or not torch.equal(allowed, causal.expand_as(allowed)):
        raise KvqError("the kvq cache runs plain causal attention only: padded batches (attention_mask with "
                       "padding) and sliding-window attention are not supported")


def packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Set as ``module._kvq_attention`` on bound layers: attention over the layer's packed cache.

    ``query (B, Hq, Tq, D)``; ``key``/``value`` are the chunk ``update()`` just stored, post-RoPE and in full
    precision: a prefill chunk attends to them as they are (``KVQLayer.attend``), the history as stored.
    Returns ``(B, Tq, Hq, D)`` in the query's dtype and
    ``None`` weights, as transformers' attention functions. Forwards run with another cache (or none)
    fall back to SDPA.
    """
    layer = getattr(module, "_kvq_layer", None)
    if layer is None or layer.pending != query.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer.pending = 0
    total = layer.get_seq_length()
    if layer.index == 0:
        check_causal(attention_mask, total, query.shape[2])
    scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or 1.0 / math.sqrt(query.shape[-1])
    out = layer.attend(query, float(scaling), (key, value))  # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous().to(query.dtype), None
