"""Readable PyTorch references for the vector-quantized caches ``cq`` and ``pq`` (Triton: ``cq_decode``, ``pq_decode``).

Code rows (``pack_vq_codes`` / ``unpack_vq_codes``)
    The n codes of one token-head (cq: one per group of c channels, n = D / c; pq: one per subspace, n = M),
    each ``bits`` bits (1..12), form one LSB-first bit stream: code j occupies bits ``[j*bits, (j+1)*bits)``,
    bit k of the row is bit ``k % 8`` of byte ``k // 8``. A row is ``ceil(n * bits / 8)`` bytes (``uint8``);
    exact (no padding) when ``n * bits`` is a multiple of 8, e.g. always at D = 128 with c <= 16 or M >= 8.
    8-bit codes are therefore plain bytes; 4-bit codes two per byte, low nibble first.

CQ (``CQCache``; arXiv 2405.03917; one codebook per KV head and channel group)
    k_codes, v_codes ``uint8 (B, H, Tmax, ceil(G*bits/8))``, G = D / c;
    ck, cv ``(H, G, 2^bits, c)`` float16/float32 codebooks: channel ``g*c + i`` of a token is ``cb[h, g, code_g, i]``.
    Keys are pre-RoPE when ``pre_rope`` (in the sink and residual too) and rotated at their own position.

PQ (``PQCache``; MILLION, DAC 2025; codebooks shared by all heads)
    k_codes, v_codes ``uint8 (B, H, Tmax, ceil(M*bits/8))``; ck, cv ``(M, 2^bits, D / M)``: dims
    ``[m*dm, (m+1)*dm)`` of a token are ``cb[m, code_m]``. Keys post-RoPE. Scores straight from the codes:
    per query a table ``T[m, j] = q_m . ck[m, j]`` and ``score = sum_m T[m, code_m]``.
    Per-head codebooks (kvq's ``pq:head_codebooks``): ck, cv ``(H, M, 2^bits, D / M)``, KV head h reads
    ``cb[h]``. ``key_order`` (kvq's ``pq:rope_pairs``): a permutation ``(D,)`` of the channels; the packed
    keys' dims are in that order (dim i of the decoded row is channel ``key_order[i]``), so their table is
    built from ``q[..., key_order]``; the fp16 sink and residual keys keep the natural order.

Both: fp16 ``sink_k, sink_v (B, H, S, D)``, ``res_k, res_v (B, H, Rmax, D)``; positions sink ``[0, S)``, packed
``[S, S + n_packed)``, residual after. Decode attention: ``q (B, H*G, D)`` post-RoPE, query head i reads KV
head ``i // G``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import FP16Segments, apply_rope, attention_ref, rope_inv_freq


# ----------------------------------------------------------------------------------------------- code rows
def row_bytes(n: int, bits: int) -> int:
    """Bytes of one row of ``n`` codes of ``bits`` bits."""
    return -(-n * bits // 8)


def pack_vq_codes(codes: Tensor, bits: int) -> Tensor:
    """``codes (..., n)`` integers in ``[0, 2^bits)`` -> ``uint8 (..., ceil(n*bits/8))`` bit-stream rows."""
    if not 1 <= bits <= 12:
        raise ValueError(f"bits must be 1..12, not {bits}")
    n = codes.shape[-1]
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.to(torch.int32)[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], n * bits)
    stream = torch.nn.functional.pad(stream, (0, row_bytes(n, bits) * 8 - n * bits))
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream.reshape(*codes.shape[:-1], row_bytes(n, bits), 8) * weights).sum(-1).to(torch.uint8)


def unpack_vq_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_vq_codes``: ``uint8 (..., ceil(n*bits/8))`` -> ``int16 (..., n)``."""
    bit = (packed.to(torch.int32)[..., None] >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    stream = bit.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., : n * bits].reshape(*packed.shape[:-1], n, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.int16)


# ----------------------------------------------------------------------------------------------- caches
@dataclass(kw_only=True)
class VQCache(FP16Segments):
    """The fields both vector-quantized caches share: code rows, codebooks, fp16 sink and residual."""

    k_codes: Tensor
    v_codes: Tensor
    ck: Tensor
    cv: Tensor
    bits: int


@dataclass(kw_only=True)
class CQCache(VQCache):
    """One layer of a CQ packed cache (shapes in the module docstring)."""

    pre_rope: bool = True
    rope_theta: float = 10000.0
    #: The model's own RoPE inverse frequencies ``(D/2,)``; None: from ``rope_theta``.
    inv_freq: Tensor | None = None

    @property
    def head_dim(self) -> int:
        return self.ck.shape[1] * self.ck.shape[3]

    @property
    def groups(self) -> int:
        return self.ck.shape[1]

    def rope_frequencies(self, device) -> Tensor:
        if self.inv_freq is not None:
            return self.inv_freq.to(device, torch.float32).contiguous()
        return rope_inv_freq(self.head_dim, self.rope_theta, device)


@dataclass(kw_only=True)
class PQCache(VQCache):
    """One layer of a PQ (MILLION) packed cache (shapes in the module docstring)."""

    #: Channel order of the packed keys ``(D,)`` (None: natural order), see the module docstring.
    key_order: Tensor | None = None

    @property
    def head_dim(self) -> int:
        return self.ck.shape[-3] * self.ck.shape[-1]

    @property
    def subspaces(self) -> int:
        return self.ck.shape[-3]

    def table_query(self, q: Tensor) -> Tensor:
        """The query as the packed keys' table needs it: ``q (B, Hq, D)`` with its channels in ``key_order``."""
        return q if self.key_order is None else q[..., self.key_order.to(q.device).long()]


def empty_vq_cache(kind: str, batch, heads, max_tokens, bits, ck, cv, n_sink=0, max_res=0, **extra):
    """A zeroed ``CQCache`` (``kind="cq"``) or ``PQCache`` for codebooks ``ck``/``cv``."""
    n = ck.shape[1] if kind == "cq" else ck.shape[-3]
    d = ck.shape[1] * ck.shape[3] if kind == "cq" else ck.shape[-3] * ck.shape[-1]
    dev = ck.device
    codes = [torch.zeros(batch, heads, max_tokens, row_bytes(n, bits), dtype=torch.uint8, device=dev) for _ in "kv"]
    f16 = [torch.zeros(batch, heads, s, d, dtype=torch.float16, device=dev) for s in (n_sink, n_sink, max_res, max_res)]
    cls = CQCache if kind == "cq" else PQCache
    return cls(k_codes=codes[0], v_codes=codes[1], ck=ck, cv=cv, **dict(zip(("sink_k", "sink_v", "res_k", "res_v"),
                                                                            f16, strict=True)), bits=bits, **extra)


# ----------------------------------------------------------------------------------------------- references
def cq_decode_codes(codes: Tensor, codebook: Tensor) -> Tensor:
    """``codes (B, H, T, G)`` into codebook ``(H, G, K, c)`` -> float32 ``(B, H, T, G*c)``."""
    b, h, t, g = codes.shape
    heads = torch.arange(h, device=codes.device).view(1, h, 1, 1)
    groups = torch.arange(g, device=codes.device).view(1, 1, 1, g)
    return codebook.float()[heads, groups, codes.long()].reshape(b, h, t, g * codebook.shape[-1])


def pq_decode_codes(codes: Tensor, codebook: Tensor) -> Tensor:
    """``codes (B, H, T, M)`` into codebook ``(M, K, dm)`` (per head: ``(H, M, K, dm)``) -> ``(B, H, T, M*dm)``."""
    b, h, t, m = codes.shape
    sub = torch.arange(m, device=codes.device)
    if codebook.dim() == 4:
        x = codebook.float()[torch.arange(h, device=codes.device).view(1, h, 1, 1), sub, codes.long()]
    else:
        x = codebook.float()[sub, codes.long()]
    return x.reshape(b, h, t, m * codebook.shape[-1])


def _full(cache, k_packed: Tensor, v_packed: Tensor) -> tuple[Tensor, Tensor]:
    """Sink + packed + residual, float32 ``(B, H, S + n_packed + n_res, D)`` (keys as stored)."""
    k = torch.cat([cache.sink_k.float(), k_packed, cache.res_k[:, :, : cache.n_res].float()], 2)
    v = torch.cat([cache.sink_v.float(), v_packed, cache.res_v[:, :, : cache.n_res].float()], 2)
    return k, v


def dequantize_cq_cache(cache: CQCache) -> tuple[Tensor, Tensor]:
    """-> (keys post-RoPE, values), float32 ``(B, H, S + n_packed + n_res, D)``."""
    t, g = cache.n_packed, cache.groups
    kq = cq_decode_codes(unpack_vq_codes(cache.k_codes[:, :, :t], cache.bits, g), cache.ck)
    vq = cq_decode_codes(unpack_vq_codes(cache.v_codes[:, :, :t], cache.bits, g), cache.cv)
    k, v = _full(cache, kq, vq)
    if cache.pre_rope:
        k = apply_rope(k, torch.arange(k.shape[2], device=k.device), cache.rope_theta, cache.inv_freq)
    return k, v


def decode_attention_cq_ref(q: Tensor, cache: CQCache, sm_scale: float | None = None) -> Tensor:
    """Decode attention over a ``CQCache``: ``q (B, H*G, D)`` -> ``(B, H*G, D)`` in q's dtype."""
    k, v = dequantize_cq_cache(cache)
    return attention_ref(q, k, v, sm_scale).to(q.dtype)


def pq_score_table(q: Tensor, codebook: Tensor) -> Tensor:
    """MILLION's per-query table ``T[b, i, m, j] = q_m . c_{m, j}``: q ``(B, Hq, D)`` -> float32 ``(B, Hq, M, K)``.

    Per-head codebooks ``(H, M, K, dm)``: query head i uses KV head ``i // (Hq / H)``'s."""
    b, hq, d = q.shape
    m = codebook.shape[-3]
    qm = q.float().reshape(b, hq, m, d // m)
    if codebook.dim() == 4:
        book = codebook.float().repeat_interleave(hq // codebook.shape[0], 0)  # (Hq, M, K, dm)
        return torch.einsum("bhmi,hmki->bhmk", qm, book)
    return torch.einsum("bhmi,mki->bhmk", qm, codebook.float())


def decode_attention_pq_ref(q: Tensor, cache: PQCache, sm_scale: float | None = None) -> Tensor:
    """Decode attention over a ``PQCache``, packed keys scored by table lookups: ``(B, H*G, D)`` in q's dtype."""
    b, hq, d = q.shape
    h, t, m = cache.k_codes.shape[1], cache.n_packed, cache.subspaces
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    codes = unpack_vq_codes(cache.k_codes[:, :, :t], cache.bits, m).long()  # (B, H, T, M)
    codes = codes.repeat_interleave(hq // h, 1)  # (B, Hq, T, M)
    table = pq_score_table(cache.table_query(q), cache.ck)  # (B, Hq, M, K)
    packed = table[:, :, None].expand(b, hq, t, m, -1).gather(-1, codes[..., None])[..., 0].sum(-1)  # (B, Hq, T)
    vq = pq_decode_codes(unpack_vq_codes(cache.v_codes[:, :, :t], cache.bits, m), cache.cv)
    k16, v = _full(cache, torch.zeros(b, h, 0, d, device=q.device), vq)
    k16 = k16.repeat_interleave(hq // h, 1)  # (B, Hq, S + n_res, D): the fp16 tokens
    dense = torch.einsum("bhd,bhtd->bht", q.float(), k16)
    s = torch.cat([dense[:, :, : cache.n_sink], packed, dense[:, :, cache.n_sink :]], 2)  # positions in order
    p = torch.softmax(s * scale, -1)  # (B, Hq, S + n_packed + n_res)
    return torch.einsum("bht,bhtd->bhd", p, v.repeat_interleave(hq // h, 1)).to(q.dtype)
