"""Readable PyTorch references for the bit-packed quantized KV cache (the Triton kernels must match them).

Layout (one attention layer; B batch, H KV heads, G query heads per KV head, D head_dim, bits b):

Bit packing (``pack_codes`` / ``unpack_codes``)
    The D codes of one token-head occupy exactly ``D * b / 8`` bytes (``uint8``). A code of b bits is split
    into *planes*: b=1 -> [1], b=2 -> [2], b=3 -> [2, 1] (low 2 bits, then bit 2), b=4 -> [4]. A plane of
    p bits stores ``n = 8 / p`` codes per byte, adjacent: byte j of the plane holds codes ``j*n + s`` at
    bit offset ``s*p`` (s = 0..n-1, LSB first). A row is the concatenation of its planes' bytes. Each
    half of the head (channels ``[0, D/2)`` and ``[D/2, D)``) therefore sits in its own contiguous byte
    range of every plane, which the decode kernel uses to apply RoPE's rotate_half without shuffles.
    Requirements: ``D`` a power of two, ``D/2 * p`` a multiple of 8 for every plane (D >= 16 for odd b).

KVQuant flavour (``KVQuantCache``; keys pre-RoPE per channel, values per token, NUQ codebooks)
    k_packed ``uint8 (B, H, Tmax, D*bk/8)``; v_packed ``uint8 (B, H, Tmax, D*bv/8)``;
    v_min, v_scale ``float16 (B, H, Tmax)``; lo, hi ``float32 (H, D)``; ck ``float32 (2^bk,)``, cv ``float32
    (2^bv,)`` sorted codebooks in [-1, 1].
    Keys: ``x = clamp(2*(k-lo)/(hi-lo) - 1, -1, 1)`` (entries outside ``[lo, hi]`` are clipped); values:
    v_min / v_scale are the token-head's min / (max - min), rounded to fp16, and the codes are computed from the
    rounded statistics. Code = number of codebook midpoints ``(c[j] + c[j+1]) / 2`` strictly below x (= the
    nearest centroid, the lower one on an exact tie).
    KVQuant's dense-and-sparse outliers are per-row sparse entries (``k_sparse`` / ``v_sparse``,
    ``kvq_kernels.sparse.SparseRows``: any number per token and head, as the runtime stores them), each replacing
    its dequantized entry (keys: before RoPE); the dense codes under them are those of the clipped value (the
    runtime's encode decides which entries are outliers and what range the rest span).

KIVI flavour (``KIVICache``; keys post-RoPE per channel, grouped along tokens; values per token)
    k_packed ``uint8 (B, H, Tmax, D*b/8)``; k_scale, k_zero ``float16 (B, H, ceil(Tmax/g), D)`` per group of
    g consecutive tokens (``group``, 32 by default; a partial last group uses the tokens it has).
    v_packed ``uint8 (B, H, Tmax, D*b/8)``; v_scale, v_zero ``float16 (B, H, Tmax, D/VG)``, VG = min(g, D).
    zero = min, scale = (max - min) / (2^b - 1) (fp16), code = clamp(floor((x - zero)/scale + 0.5), 0, 2^b-1)
    from the fp16 statistics (scale 0 -> code 0); dequant ``zero + code * scale``.

Full-precision segments (both flavours): ``sink_k, sink_v (B, H, S, D)`` and ``res_k, res_v (B, H, Rmax, D)``
    fp16; kvquant keys are pre-RoPE there too. Token positions are implied: sink ``[0, S)``, packed
    ``[S, S + n_packed)``, residual ``[S + n_packed, S + n_packed + n_res)``. The packed buffers hold
    ``n_packed`` valid tokens (same for every batch row).

Decode attention: q ``(B, H*G, D)`` (post-RoPE, query head i reads KV head ``i // G``); output
``(B, H*G, D)`` = softmax(q . k * sm_scale) v over sink + packed + residual, keys RoPE'd at their own
position (HF rotate_half convention, ``inv_freq[i] = theta^(-2i/D)``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # (sparse imports this module's host helpers)
    from .sparse import SparseRows

KIVI_KEY_GROUP = 32


# ----------------------------------------------------------------------------------------------- packing
def planes(bits: int) -> list[int]:
    """Bit planes of a ``bits``-bit code, low bits first."""
    if bits not in (1, 2, 3, 4):
        raise ValueError(f"bits must be 1..4, not {bits}")
    return {1: [1], 2: [2], 3: [2, 1], 4: [4]}[bits]


def packed_bytes(head_dim: int, bits: int) -> int:
    """Bytes one token-head's codes occupy."""
    check_head_dim(head_dim, bits)
    return head_dim * bits // 8


def check_head_dim(head_dim: int, bits: int) -> None:
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, not {head_dim}")
    for p in planes(bits):
        if (head_dim // 2 * p) % 8:
            raise ValueError(f"head_dim {head_dim} cannot hold {bits}-bit codes per half without waste")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``codes (..., D)`` integers in ``[0, 2^bits)`` -> ``uint8 (..., D*bits/8)``."""
    d = codes.shape[-1]
    check_head_dim(d, bits)
    c = codes.to(torch.int32)
    out, low = [], 0
    for p in planes(bits):
        n = 8 // p
        part = ((c >> low) & ((1 << p) - 1)).reshape(*c.shape[:-1], d // n, n)
        shifts = torch.arange(n, device=c.device, dtype=torch.int32) * p
        out.append((part << shifts).sum(-1))
        low += p
    return torch.cat(out, -1).to(torch.uint8)


#: Spreading one byte of a ``p``-bit plane into ``8 / p`` code bytes inside a machine word, a halving at a time:
#: ``x = (x + (x << s)) & mask`` (as a multiply by ``1 + 2^s`` where the shifted copy cannot overlap, else an OR).
#: Little-endian words, so the word's bytes read back in channel order.
_SPREAD = {
    4: (torch.int16, [(4, 0x0F0F)]),  # byte -> 2 nibbles
    2: (torch.int32, [(12, 0x000F000F), (6, 0x03030303)]),  # byte -> 2 nibbles -> 4 2-bit fields
    1: (torch.int64, [(28, 0x0000000F0000000F), (14, 0x0003000300030003), (7, 0x0101010101010101)]),
}


def unpack_codes(packed: Tensor, bits: int, head_dim: int) -> Tensor:
    """Inverse of ``pack_codes``: ``uint8 (..., D*bits/8)`` -> ``uint8 (..., D)``.

    Each plane's bytes are widened to words and their fields spread one per byte with a few whole-tensor
    multiply/mask steps (``_SPREAD``), so the codes come out in channel order without a strided interleave (the
    CPU reference path unpacks the whole history at every decode step)."""
    check_head_dim(head_dim, bits)
    if sys.byteorder != "little":
        raise RuntimeError("unpack_codes reads words as little-endian bytes")
    lead = packed.shape[:-1]
    codes, col, low = None, 0, 0
    for p in planes(bits):
        w = head_dim * p // 8  # bytes of this plane
        dtype, steps = _SPREAD[p]
        x = packed[..., col : col + w].to(dtype)  # (..., w): one word per byte, 8 / p code bytes once spread
        for shift, mask in steps:
            x = (x.bitwise_or_(x << shift) if p == 4 else x.mul_(1 + (1 << shift))).bitwise_and_(mask)
        x = x.view(torch.uint8)  # (..., D): code bytes in channel order
        codes = x if codes is None else codes.view(torch.int64).bitwise_or_(x.view(torch.int64) << low).view(
            torch.uint8)
        col += w
        low += p
    return codes.reshape(*lead, head_dim)


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """HF's ``inv_freq`` (float32, ``(D/2,)``)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def apply_rope(x: Tensor, positions: Tensor, theta: float, inv_freq: Tensor | None = None) -> Tensor:
    """HF rotate_half RoPE of ``x (..., T, D)`` at integer ``positions (T,)``; float32 angles.

    ``inv_freq (D/2,)``: the model's own frequencies; None computes them from ``theta``."""
    d = x.shape[-1]
    invf = rope_inv_freq(d, theta, x.device) if inv_freq is None else inv_freq.to(x.device, torch.float32)
    freqs = positions.to(torch.float32)[:, None] * invf[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    xf = x.to(torch.float32)
    rot = torch.cat([-xf[..., d // 2 :], xf[..., : d // 2]], -1)
    return xf * cos + rot * sin


# ----------------------------------------------------------------------------------------------- helpers
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a jit-callable, slower per call, on every decode layer)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1), for host code (as ``triton.next_power_of_2``, without its cost)."""
    return 1 << max(n - 1, 0).bit_length()


def codebook_midpoints(codebook: Tensor) -> Tensor:
    cb = codebook.to(torch.float32)
    return (cb[:-1] + cb[1:]) / 2


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest centroid of a sorted codebook (count of midpoints strictly below x)."""
    mids = codebook_midpoints(codebook).to(x.device)
    return (x[..., None] > mids).sum(-1).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- kvquant
def quantize_keys_kvquant(k: Tensor, lo: Tensor, hi: Tensor, ck: Tensor, bits: int) -> Tensor:
    """Pre-RoPE keys ``(B, H, T, D)`` -> k_packed uint8 (entries outside ``[lo, hi]`` clipped)."""
    kf = k.to(torch.float32)
    lo_, hi_ = lo.to(torch.float32)[:, None, :], hi.to(torch.float32)[:, None, :]
    x = torch.clamp(2 * (kf - lo_) / (hi_ - lo_) - 1, -1, 1)
    return pack_codes(nearest_code(x, ck), bits)


def dequantize_keys_kvquant(k_packed, lo, hi, ck, bits: int, head_dim: int) -> Tensor:
    """-> pre-RoPE keys float32 ``(B, H, T, D)``."""
    codes = unpack_codes(k_packed, bits, head_dim).long()
    lo_, hi_ = lo.to(torch.float32)[:, None, :], hi.to(torch.float32)[:, None, :]
    return lo_ + (ck.to(torch.float32)[codes] + 1) / 2 * (hi_ - lo_)


def quantize_values_nuq(v: Tensor, cv: Tensor, bits: int):
    """Values ``(B, H, T, D)`` -> (v_packed, v_min fp16, v_scale fp16) over each token-head's D entries."""
    vf = v.to(torch.float32)
    vmin16, vscale16 = vf.amin(-1).to(torch.float16), (vf.amax(-1) - vf.amin(-1)).to(torch.float16)
    mn, sc = vmin16.to(torch.float32)[..., None], vscale16.to(torch.float32)[..., None]
    x = torch.clamp(2 * (vf - mn) / torch.where(sc > 0, sc, torch.ones_like(sc)) - 1, -1, 1)
    return pack_codes(nearest_code(x, cv), bits), vmin16, vscale16


def dequantize_values_nuq(v_packed, v_min, v_scale, cv, bits: int, head_dim: int) -> Tensor:
    codes = unpack_codes(v_packed, bits, head_dim).long()
    mn, sc = v_min.to(torch.float32)[..., None], v_scale.to(torch.float32)[..., None]
    return mn + (cv.to(torch.float32)[codes] + 1) / 2 * sc


# ----------------------------------------------------------------------------------------------- kivi
def _uniform_codes(x: Tensor, zero16: Tensor, scale16: Tensor, bits: int) -> Tensor:
    z, s = zero16.to(torch.float32), scale16.to(torch.float32)
    q = torch.floor((x - z) / torch.where(s > 0, s, torch.ones_like(s)) + 0.5)
    return torch.clamp(q, 0, (1 << bits) - 1).to(torch.uint8)


def quantize_keys_kivi(k: Tensor, bits: int, group: int = KIVI_KEY_GROUP):
    """Post-RoPE keys ``(B, H, T, D)`` -> (k_packed, k_scale fp16, k_zero fp16) with ``(B, H, ceil(T/group), D)``
    statistics (per channel, per group of ``group`` tokens; a partial last group uses its own tokens)."""
    b, h, t, d = k.shape
    kf = k.to(torch.float32)
    ng = -(-t // group)
    pad = ng * group - t
    kp = torch.nn.functional.pad(kf, (0, 0, 0, pad))
    valid = torch.arange(ng * group, device=k.device) < t
    kg = kp.reshape(b, h, ng, group, d)
    vg = valid.reshape(ng, group)[None, None, :, :, None]
    mn = kg.masked_fill(~vg, math.inf).amin(3)
    mx = kg.masked_fill(~vg, -math.inf).amax(3)
    zero16, scale16 = mn.to(torch.float16), ((mx - mn) / ((1 << bits) - 1)).to(torch.float16)
    zt = zero16.repeat_interleave(group, 2)[:, :, :t]
    st = scale16.repeat_interleave(group, 2)[:, :, :t]
    codes = _uniform_codes(kf, zt, st, bits)
    return pack_codes(codes, bits), scale16, zero16


def dequantize_keys_kivi(k_packed, k_scale, k_zero, bits: int, head_dim: int, group: int = KIVI_KEY_GROUP):
    codes = unpack_codes(k_packed, bits, head_dim).to(torch.float32)
    t = codes.shape[2]
    st = k_scale.to(torch.float32).repeat_interleave(group, 2)[:, :, :t]
    zt = k_zero.to(torch.float32).repeat_interleave(group, 2)[:, :, :t]
    return zt + codes * st


def kivi_group_supported(group: int) -> bool:
    """The kivi kernels' groups: powers of two >= 16 (a tensor-core block of 16 tokens lies in one key group)."""
    return group >= 16 and group & (group - 1) == 0


def value_group(head_dim: int, group: int = KIVI_KEY_GROUP) -> int:
    """Channels per value group: the kivi group, at most the head."""
    return min(group, head_dim)


def quantize_values_kivi(v: Tensor, bits: int, group: int = KIVI_KEY_GROUP):
    """Values ``(B, H, T, D)`` -> (v_packed, v_scale fp16, v_zero fp16) with ``(B, H, T, D/VG)`` statistics."""
    b, h, t, d = v.shape
    vg = value_group(d, group)
    vf = v.to(torch.float32).reshape(b, h, t, d // vg, vg)
    mn, mx = vf.amin(-1), vf.amax(-1)
    zero16, scale16 = mn.to(torch.float16), ((mx - mn) / ((1 << bits) - 1)).to(torch.float16)
    codes = _uniform_codes(vf, zero16[..., None], scale16[..., None], bits).reshape(b, h, t, d)
    return pack_codes(codes, bits), scale16, zero16


def dequantize_values_kivi(v_packed, v_scale, v_zero, bits: int, head_dim: int, group: int = KIVI_KEY_GROUP):
    codes = unpack_codes(v_packed, bits, head_dim).to(torch.float32)
    vg = value_group(head_dim, group)
    s = v_scale.to(torch.float32).repeat_interleave(vg, -1)
    z = v_zero.to(torch.float32).repeat_interleave(vg, -1)
    return z + codes * s


# ----------------------------------------------------------------------------------------------- caches
@dataclass(kw_only=True)
class FP16Segments:
    """What every packed-cache view shares: the fp16 sink ``sink_k, sink_v (B, H, S, D)``, the residual window
    ``res_k, res_v (B, H, R_max, D)`` (the first ``n_res`` rows used) and the packed token count."""

    sink_k: Tensor
    sink_v: Tensor
    res_k: Tensor
    res_v: Tensor
    n_packed: int = 0
    n_res: int = 0

    @property
    def n_sink(self) -> int:
        return self.sink_k.shape[2]

    def fp16_bytes(self) -> int:
        """Bytes of the sink and of the used residual rows, keys and values."""
        return (self.sink_k.numel() * 2 + self.res_k[:, :, : self.n_res].numel()) * 2


@dataclass(kw_only=True)
class KVQuantCache(FP16Segments):
    """One layer of the kvquant-flavour packed cache (see the module docstring for shapes)."""

    k_packed: Tensor
    v_packed: Tensor
    v_min: Tensor
    v_scale: Tensor
    lo: Tensor
    hi: Tensor
    ck: Tensor
    cv: Tensor
    bits_k: int
    bits_v: int
    rope_theta: float = 10000.0
    #: The model's own RoPE inverse frequencies ``(D/2,)`` float32; None: computed from ``rope_theta``.
    inv_freq: Tensor | None = None
    #: Per-row sparse outliers of the packed tokens (``kvq_kernels.sparse``): keys pre-RoPE, each replacing its
    #: dequantized entry.
    k_sparse: SparseRows | None = None
    v_sparse: SparseRows | None = None

    def rope_frequencies(self, device) -> Tensor:
        """``inv_freq`` the kernels rotate keys with (the model's own when given, so they match it bit for bit)."""
        if self.inv_freq is not None:
            return self.inv_freq.to(device, torch.float32).contiguous()
        return rope_inv_freq(self.head_dim, self.rope_theta, device)

    @classmethod
    def empty(cls, batch, heads, head_dim, max_tokens, bits_k, bits_v, lo, hi, ck, cv, n_sink=0, max_res=0,
              rope_theta=10000.0, device=None) -> KVQuantCache:
        dev = device if device is not None else lo.device
        bh = (batch, heads, max_tokens)
        return cls(
            k_packed=torch.zeros(*bh, packed_bytes(head_dim, bits_k), dtype=torch.uint8, device=dev),
            v_packed=torch.zeros(*bh, packed_bytes(head_dim, bits_v), dtype=torch.uint8, device=dev),
            v_min=torch.zeros(bh, dtype=torch.float16, device=dev),
            v_scale=torch.zeros(bh, dtype=torch.float16, device=dev),
            lo=lo.to(dev, torch.float32).contiguous(), hi=hi.to(dev, torch.float32).contiguous(),
            ck=ck.to(dev, torch.float32).contiguous(), cv=cv.to(dev, torch.float32).contiguous(),
            sink_k=torch.zeros(batch, heads, n_sink, head_dim, dtype=torch.float16, device=dev),
            sink_v=torch.zeros(batch, heads, n_sink, head_dim, dtype=torch.float16, device=dev),
            res_k=torch.zeros(batch, heads, max_res, head_dim, dtype=torch.float16, device=dev),
            res_v=torch.zeros(batch, heads, max_res, head_dim, dtype=torch.float16, device=dev),
            bits_k=bits_k, bits_v=bits_v, rope_theta=rope_theta,
        )

    @property
    def head_dim(self) -> int:
        return self.lo.shape[-1]

    def compressed_bytes(self) -> int:
        """Bytes attention reads from the packed segment plus the fp16 segments (codebooks ignored)."""
        t = self.n_packed
        per_tok = sum(x[:, :, :t].numel() * x.element_size() for x in (self.k_packed, self.v_packed, self.v_min,
                                                                        self.v_scale))
        return per_tok + self.fp16_bytes() + sum(r.nbytes() for r in (self.k_sparse, self.v_sparse) if r is not None)


@dataclass(kw_only=True)
class KIVICache(FP16Segments):
    """One layer of the kivi-flavour packed cache (see the module docstring for shapes)."""

    k_packed: Tensor
    k_scale: Tensor
    k_zero: Tensor
    v_packed: Tensor
    v_scale: Tensor
    v_zero: Tensor
    bits: int
    #: tokens per key group and channels per value group (at most D); the kernels take powers of two >= 16
    group: int = KIVI_KEY_GROUP

    @classmethod
    def empty(cls, batch, heads, head_dim, max_tokens, bits, n_sink=0, max_res=0, device=None,
              group: int = KIVI_KEY_GROUP) -> KIVICache:
        bh = (batch, heads, max_tokens)
        ng = cdiv(max_tokens, group)
        nvg = head_dim // value_group(head_dim, group)
        f16 = dict(dtype=torch.float16, device=device)
        return cls(
            k_packed=torch.zeros(*bh, packed_bytes(head_dim, bits), dtype=torch.uint8, device=device),
            k_scale=torch.zeros(batch, heads, ng, head_dim, **f16),
            k_zero=torch.zeros(batch, heads, ng, head_dim, **f16),
            v_packed=torch.zeros(*bh, packed_bytes(head_dim, bits), dtype=torch.uint8, device=device),
            v_scale=torch.zeros(*bh, nvg, **f16),
            v_zero=torch.zeros(*bh, nvg, **f16),
            sink_k=torch.zeros(batch, heads, n_sink, head_dim, **f16),
            sink_v=torch.zeros(batch, heads, n_sink, head_dim, **f16),
            res_k=torch.zeros(batch, heads, max_res, head_dim, **f16),
            res_v=torch.zeros(batch, heads, max_res, head_dim, **f16),
            bits=bits, group=group,
        )

    @property
    def head_dim(self) -> int:
        return self.k_packed.shape[-1] * 8 // self.bits

    def compressed_bytes(self) -> int:
        t = self.n_packed
        ng = cdiv(t, self.group)
        per = sum(x[:, :, :t].numel() * x.element_size() for x in (self.k_packed, self.v_packed, self.v_scale,
                                                                    self.v_zero))
        per += sum(x[:, :, :ng].numel() * x.element_size() for x in (self.k_scale, self.k_zero))
        return per + self.fp16_bytes()


# ----------------------------------------------------------------------------------------------- dequant + attention
def _with_sparse(rows: SparseRows | None, x: Tensor) -> Tensor:
    """``x (B, H, T, D)`` with the per-row sparse outliers of tokens ``[0, T)`` put in (as they are: None)."""
    if rows is None:
        return x
    mask, vals = rows.dense(0, x.shape[2])
    return torch.where(mask, vals.float(), x)


def dequantize_kvquant_cache(cache: KVQuantCache) -> tuple[Tensor, Tensor]:
    """-> (keys post-RoPE, values), float32 ``(B, H, S + n_packed + n_res, D)``."""
    d, t = cache.head_dim, cache.n_packed
    kq = dequantize_keys_kvquant(cache.k_packed[:, :, :t], cache.lo, cache.hi, cache.ck, cache.bits_k, d)
    vq = dequantize_values_nuq(cache.v_packed[:, :, :t], cache.v_min[:, :, :t], cache.v_scale[:, :, :t], cache.cv,
                               cache.bits_v, d)
    kq, vq = _with_sparse(cache.k_sparse, kq), _with_sparse(cache.v_sparse, vq)
    k = torch.cat([cache.sink_k.float(), kq, cache.res_k[:, :, : cache.n_res].float()], 2)
    v = torch.cat([cache.sink_v.float(), vq, cache.res_v[:, :, : cache.n_res].float()], 2)
    pos = torch.arange(k.shape[2], device=k.device)
    return apply_rope(k, pos, cache.rope_theta, cache.inv_freq), v


def dequantize_kivi_cache(cache: KIVICache) -> tuple[Tensor, Tensor]:
    d, t, g = cache.head_dim, cache.n_packed, cache.group
    ng = cdiv(t, g)
    kq = dequantize_keys_kivi(cache.k_packed[:, :, :t], cache.k_scale[:, :, :ng], cache.k_zero[:, :, :ng],
                              cache.bits, d, g)
    vq = dequantize_values_kivi(cache.v_packed[:, :, :t], cache.v_scale[:, :, :t], cache.v_zero[:, :, :t],
                                cache.bits, d, g)
    k = torch.cat([cache.sink_k.float(), kq, cache.res_k[:, :, : cache.n_res].float()], 2)
    v = torch.cat([cache.sink_v.float(), vq, cache.res_v[:, :, : cache.n_res].float()], 2)
    return k, v


def attention_ref(q: Tensor, k: Tensor, v: Tensor, sm_scale: float | None = None) -> Tensor:
    """Plain decode attention: q ``(B, H*G, D)``, k/v ``(B, H, T, D)`` (keys already RoPE'd) -> float32."""
    b, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qf = q.to(torch.float32).reshape(b, h, g, d)
    s = torch.einsum("bhgd,bhtd->bhgt", qf, k.to(torch.float32)) * scale
    p = torch.softmax(s, -1)
    return torch.einsum("bhgt,bhtd->bhgd", p, v.to(torch.float32)).reshape(b, hq, d)


def decode_attention_kvquant_ref(q: Tensor, cache: KVQuantCache, sm_scale: float | None = None) -> Tensor:
    k, v = dequantize_kvquant_cache(cache)
    return attention_ref(q, k, v, sm_scale).to(q.dtype)


def decode_attention_kivi_ref(q: Tensor, cache: KIVICache, sm_scale: float | None = None) -> Tensor:
    k, v = dequantize_kivi_cache(cache)
    return attention_ref(q, k, v, sm_scale).to(q.dtype)


# ----------------------------------------------------------------------------------------------- append (reference)
def append_kvquant_ref(cache: KVQuantCache, k: Tensor, v: Tensor, offset: int):
    """Quantize ``k`` (pre-RoPE) and ``v`` ``(B, H, Tn, D)`` into the packed buffers at ``offset`` (in place; the
    dense part only: outliers go to ``k_sparse`` / ``v_sparse``)."""
    sl = slice(offset, offset + k.shape[2])
    cache.k_packed[:, :, sl] = quantize_keys_kvquant(k, cache.lo, cache.hi, cache.ck, cache.bits_k)
    cache.v_packed[:, :, sl], cache.v_min[:, :, sl], cache.v_scale[:, :, sl] = quantize_values_nuq(
        v, cache.cv, cache.bits_v)


def append_kivi_ref(cache: KIVICache, k: Tensor, v: Tensor, offset: int):
    """Quantize ``k`` (post-RoPE) and ``v`` ``(B, H, Tn, D)`` at ``offset`` (a multiple of the group) in place."""
    if offset % cache.group:
        raise ValueError(f"kivi keys are appended a whole group of {cache.group} tokens at a time")
    tn = k.shape[2]
    kp, ks, kz = quantize_keys_kivi(k, cache.bits, cache.group)
    vp, vs, vz = quantize_values_kivi(v, cache.bits, cache.group)
    sl = slice(offset, offset + tn)
    g0 = offset // cache.group
    cache.k_packed[:, :, sl] = kp
    cache.k_scale[:, :, g0 : g0 + ks.shape[2]] = ks
    cache.k_zero[:, :, g0 : g0 + ks.shape[2]] = kz
    cache.v_packed[:, :, sl] = vp
    cache.v_scale[:, :, sl] = vs
    cache.v_zero[:, :, sl] = vz
