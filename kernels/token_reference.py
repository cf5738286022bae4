"""Readable PyTorch reference for the per-token-vector quantized cache (kvq's ``int`` and ``nf``; Triton:
``kvq_kernels.decode_token``).

TokenCache (keys post-RoPE and values alike; one group per token-head vector of D entries)
    k_packed, v_packed ``uint8 (B, H, Tmax, D*b/8)``: b = 1..4 packed as ``kvq_kernels.reference.pack_codes``;
    b = 8: one plain byte per code, ``(B, H, Tmax, D)``.
    k_scale, v_scale ``float16 (B, H, Tmax)``; k_zero, v_zero ``float16 (B, H, Tmax)``, or None (zero = 0).
    levels ``float32 (2^b,)``: the level table a code indexes, or None (the code itself, ``0 .. 2^b - 1``).
    An entry dequantizes to ``zero + scale * L[code]`` in float32:
    * ``int`` (uniform asymmetric): identity levels, zero = the vector's min, scale = (max - min) / (2^b - 1);
    * ``nf`` (NormalFloat): levels = the NormalFloat codebook in [-1, 1], scale = the vector's absmax, no zero.
    fp16 sink and residual segments and token positions as every packed cache (``reference.FP16Segments``).

Decode attention: ``q (B, H*G, D)`` post-RoPE, query head i reads KV head ``i // G``; no RoPE anywhere (the keys
are stored post-RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import (
    FP16Segments,
    _uniform_codes,
    attention_ref,
    check_head_dim,
    nearest_code,
    pack_codes,
    unpack_codes,
)

#: code widths the cache holds: 1..4 bit-packed, 8 as plain bytes
TOKEN_BITS = (1, 2, 3, 4, 8)


def check_token_bits(head_dim: int, bits: int) -> None:
    """``ValueError`` unless ``bits`` is in ``TOKEN_BITS`` and ``head_dim`` can hold its codes."""
    if bits not in TOKEN_BITS:
        raise ValueError(f"per-token caches hold {TOKEN_BITS}-bit codes, not {bits}")
    check_head_dim(head_dim, 2 if bits == 8 else bits)  # (8-bit rows: a power of two, two halves)


def token_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one token-head's codes."""
    return head_dim * bits // 8


def pack_token_codes(codes: Tensor, bits: int) -> Tensor:
    """``codes (..., D)`` -> ``uint8 (..., D*b/8)`` (b = 8: the codes as bytes)."""
    return codes.to(torch.uint8) if bits == 8 else pack_codes(codes, bits)


def unpack_token_codes(packed: Tensor, bits: int, head_dim: int) -> Tensor:
    """Inverse of ``pack_token_codes``: ``uint8 (..., D)``."""
    return packed if bits == 8 else unpack_codes(packed, bits, head_dim)


def quantize_tokens(x: Tensor, bits: int, levels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Each vector of ``x (..., D)`` -> (packed codes, scale fp16 ``(...)``, zero fp16 ``(...)`` or None).

    ``levels`` None: uniform asymmetric (zero = min, scale = (max - min) / (2^b - 1), codes rounded from the fp16
    statistics); else absmax scaling onto a sorted codebook in [-1, 1] (the nearest level). (For filling test and
    benchmark caches; the runtime stores what its methods encode, in this layout.)"""
    xf = x.float()
    if levels is None:
        mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        zero, scale = mn.half(), ((mx - mn) / ((1 << bits) - 1)).half()
        codes = _uniform_codes(xf, zero, scale, bits)
        return pack_token_codes(codes, bits), scale[..., 0], zero[..., 0]
    scale = xf.abs().amax(-1, keepdim=True).half()
    s = scale.float()
    codes = nearest_code((xf / torch.where(s > 0, s, torch.ones_like(s))).clamp(-1, 1), levels)
    return pack_token_codes(codes, bits), scale[..., 0], None


@dataclass(kw_only=True)
class TokenCache(FP16Segments):
    """One layer of a per-token-vector quantized cache (shapes in the module docstring)."""

    k_packed: Tensor
    k_scale: Tensor
    k_zero: Tensor | None
    v_packed: Tensor
    v_scale: Tensor
    v_zero: Tensor | None
    levels: Tensor | None
    bits: int

    @classmethod
    def empty(cls, batch, heads, head_dim, max_tokens, bits, levels=None, zero=True, n_sink=0, max_res=0,
              device=None) -> TokenCache:
        check_token_bits(head_dim, bits)
        bh = (batch, heads, max_tokens)
        f16 = dict(dtype=torch.float16, device=device)
        nb = token_row_bytes(head_dim, bits)
        return cls(
            k_packed=torch.zeros(*bh, nb, dtype=torch.uint8, device=device), k_scale=torch.zeros(bh, **f16),
            k_zero=torch.zeros(bh, **f16) if zero else None,
            v_packed=torch.zeros(*bh, nb, dtype=torch.uint8, device=device), v_scale=torch.zeros(bh, **f16),
            v_zero=torch.zeros(bh, **f16) if zero else None,
            levels=None if levels is None else levels.to(device, torch.float32).contiguous(),
            sink_k=torch.zeros(batch, heads, n_sink, head_dim, **f16),
            sink_v=torch.zeros(batch, heads, n_sink, head_dim, **f16),
            res_k=torch.zeros(batch, heads, max_res, head_dim, **f16),
            res_v=torch.zeros(batch, heads, max_res, head_dim, **f16), bits=bits)

    @property
    def head_dim(self) -> int:
        return self.k_packed.shape[-1] * 8 // self.bits

    def append(self, k: Tensor, v: Tensor, offset: int) -> None:
        """Quantize ``k`` (post-RoPE) and ``v`` ``(B, H, Tn, D)`` (``quantize_tokens``) into the packed buffers at
        token ``offset``, in place (``n_packed`` unchanged)."""
        sl = slice(offset, offset + k.shape[2])
        for x, packed, scale, zero in ((k, self.k_packed, self.k_scale, self.k_zero),
                                       (v, self.v_packed, self.v_scale, self.v_zero)):
            p, s, z = quantize_tokens(x, self.bits, self.levels)
            packed[:, :, sl], scale[:, :, sl] = p, s
            if zero is not None:
                zero[:, :, sl] = z

    def compressed_bytes(self) -> int:
        """Bytes attention reads from the packed segment plus the fp16 segments (the level table ignored)."""
        t = self.n_packed
        per = sum(x[:, :, :t].numel() * x.element_size() for x in (
            self.k_packed, self.k_scale, self.k_zero, self.v_packed, self.v_scale, self.v_zero) if x is not None)
        return per + self.fp16_bytes()


def dequantize_tokens(packed: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int,
                      head_dim: int) -> Tensor:
    """``zero + scale * L[code]`` of ``T`` packed rows ``(B, H, T, nb)`` -> float32 ``(B, H, T, D)``."""
    codes = unpack_token_codes(packed, bits, head_dim).long()
    x = codes.float() if levels is None else levels.to(torch.float32)[codes]
    out = scale.float()[..., None] * x
    return out if zero is None else out + zero.float()[..., None]


def dequantize_token_cache(cache: TokenCache) -> tuple[Tensor, Tensor]:
    """-> (keys, values) float32 ``(B, H, S + n_packed + n_res, D)``."""
    d, t = cache.head_dim, cache.n_packed
    parts = []
    for packed, scale, zero, sink, res in ((cache.k_packed, cache.k_scale, cache.k_zero, cache.sink_k, cache.res_k),
                                           (cache.v_packed, cache.v_scale, cache.v_zero, cache.sink_v, cache.res_v)):
        q = dequantize_tokens(packed[:, :, :t], scale[:, :, :t], None if zero is None else zero[:, :, :t],
                              cache.levels, cache.bits, d)
        parts.append(torch.cat([sink.float(), q, res[:, :, : cache.n_res].float()], 2))
    return parts[0], parts[1]


def decode_attention_token_ref(q: Tensor, cache: TokenCache, sm_scale: float | None = None) -> Tensor:
    k, v = dequantize_token_cache(cache)
    return attention_ref(q, k, v, sm_scale).to(q.dtype)
