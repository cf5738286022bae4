"""Triton bit packing and fused quantize-and-append for the packed KV cache.

The memory layout is the one described in ``kvq_kernels.reference`` (read its docstring first): codes are
packed per token-head row of ``D*b/8`` bytes (``uint8``), planes [1] / [2] / [2, 1] / [4] for b = 1..4,
adjacent codes inside a byte (LSB first), so each half of the head is a contiguous byte range of every
plane. Everything here matches the references exactly (``torch.equal``) under ``TRITON_INTERPRET=1``;
the divisions use ``div_rn`` (IEEE round-to-nearest) so that the GPU agrees as well.

Public functions:
    pack_codes(codes, bits) -> packed            codes ``(..., D)`` integer -> ``uint8 (..., D*bits/8)``
    unpack_codes(packed, bits, head_dim) -> codes
    quantize_append_kivi(cache, k, v, offset)     post-RoPE keys + values, offset a multiple of 32

kvquant's append (KVQuant's own outliers into per-row sparse storage, as the runtime keeps them) is
``kvq_kernels.append``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import KIVICache, cdiv, check_head_dim, packed_bytes, value_group


# ----------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _pack_plane(part, P: tl.constexpr, R: tl.constexpr, W: tl.constexpr):
    """``part (R, W * 8/P)`` P-bit codes -> ``(R, W)`` int32 bytes (adjacent codes, LSB first)."""
    N: tl.constexpr = 8 // P
    x = tl.reshape(part, (R, W, N))
    sh = tl.arange(0, N) * P
    return tl.sum(x << sh[None, None, :], axis=2)


@triton.jit
def _store_codes(out_ptr, row_off, rmask, codes, BITS: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
    """Pack ``codes (R, D)`` int32 and store the row bytes at ``out_ptr + row_off (R,)``."""
    if BITS == 3:
        c2 = tl.arange(0, D // 4)
        p2 = _pack_plane(codes & 3, 2, R, D // 4)
        tl.store(out_ptr + row_off[:, None] + c2[None, :], p2.to(tl.uint8), mask=rmask[:, None])
        c1 = tl.arange(0, D // 8)
        p1 = _pack_plane((codes >> 2) & 1, 1, R, D // 8)
        tl.store(out_ptr + row_off[:, None] + D // 4 + c1[None, :], p1.to(tl.uint8), mask=rmask[:, None])
    else:
        W: tl.constexpr = D * BITS // 8
        cw = tl.arange(0, W)
        p = _pack_plane(codes, BITS, R, W)
        tl.store(out_ptr + row_off[:, None] + cw[None, :], p.to(tl.uint8), mask=rmask[:, None])


@triton.jit
def _expand_plane(b, P: tl.constexpr, R: tl.constexpr, W: tl.constexpr):
    """``b (R, W)`` int32 bytes of a P-bit plane -> ``(R, W * 8/P)`` codes, via register-local joins."""
    if P == 4:
        x = tl.join(b & 15, b >> 4)
    elif P == 2:
        x = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
    else:
        x = tl.join(
            tl.join(tl.join(b & 1, (b >> 4) & 1), tl.join((b >> 2) & 1, (b >> 6) & 1)),
            tl.join(tl.join((b >> 1) & 1, (b >> 5) & 1), tl.join((b >> 3) & 1, b >> 7)),
        )
    return tl.reshape(x, (R, W * 8 // P))


@triton.jit
def _code_bytes(base, c, valid, BITS: tl.constexpr, D: tl.constexpr):
    """The codes of channels ``c`` in the packed rows at ``base`` (broadcast together), one byte load per code
    and plane (L1 hits): int32, shaped as the broadcast of ``base``, ``c`` and ``valid``."""
    if BITS == 3:
        lo = tl.load(base + c // 4, mask=valid, other=0).to(tl.int32)
        hi = tl.load(base + D // 4 + c // 8, mask=valid, other=0).to(tl.int32)
        return ((lo >> (2 * (c % 4))) & 3) | (((hi >> (c % 8)) & 1) << 2)
    else:
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(base + c // PER, mask=valid, other=0).to(tl.int32)
        return (byte >> (BITS * (c % PER))) & ((1 << BITS) - 1)


@triton.jit
def _load_codes_half(row_ptr, rmask, HIDX: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
    """Codes of channels ``[HIDX*D/2, (HIDX+1)*D/2)`` of ``R`` packed rows (``row_ptr (R,)``) -> int32 (R, D/2).

    One vector load of the half's bytes per plane, then shifts/masks expanded with ``tl.join`` (register
    local). On the H100 this was 1.5-2.2x faster than loading one byte per code (see the results doc)."""
    HALF: tl.constexpr = D // 2
    if BITS == 3:
        W2: tl.constexpr = HALF // 4
        W1: tl.constexpr = HALF // 8
        c2 = tl.arange(0, W2)
        c1 = tl.arange(0, W1)
        b2 = tl.load(row_ptr[:, None] + HIDX * W2 + c2[None, :], mask=rmask[:, None], other=0).to(tl.int32)
        b1 = tl.load(row_ptr[:, None] + D // 4 + HIDX * W1 + c1[None, :], mask=rmask[:, None], other=0).to(tl.int32)
        return _expand_plane(b2, 2, R, W2) | (_expand_plane(b1, 1, R, W1) << 2)
    else:
        W: tl.constexpr = HALF * BITS // 8
        cw = tl.arange(0, W)
        bb = tl.load(row_ptr[:, None] + HIDX * W + cw[None, :], mask=rmask[:, None], other=0).to(tl.int32)
        return _expand_plane(bb, BITS, R, W)


# ----------------------------------------------------------------------------------------------- word unpacking
# Codes of 1, 2 or 4 bits read as 32-bit words (code i of a word at bits [b*i, b*(i+1)): the byte layout above, read
# little-endian) and turned into floats by bit tricks instead of conversion instructions (which issue at an eighth
# of the FP32 rate on Hopper). ``MODE`` (``_field``):
#   0: fp16 ``1024 + code`` (``code | 0x6400`` read as fp16);
#   1: float32 ``2^23 + code`` (``code | 0x4B000000``);
#   2: float32 ``1 + code / 16`` (the code in the mantissa's top bits under ``0x3F800000``): a product needs no
#      subtraction first, its offset is taken off a sum (``sum(a x) = sum(a) + sum(a code) / 16``).
# Every value is exact; the caller takes the offset off (or corrects a sum for it).
MAGIC_F16 = tl.constexpr(1024.0)
MAGIC_F32 = tl.constexpr(8388608.0)
UNIT_SCALE = tl.constexpr(16.0)


def words_supported(head_dim: int, bits: int) -> bool:
    """Whether each half of a packed row is whole 32-bit words (``_words``)."""
    return bits in (1, 2, 4) and (head_dim // 2 * bits) % 32 == 0


@triton.jit
def _words(P, row, valid, HIDX: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr):
    """uint32 words ``(N, D*BITS/64)`` of half ``HIDX`` of the packed rows ``row (N,)`` at ``P`` (uint8)."""
    NWH: tl.constexpr = D * BITS // 64
    wp = P.to(tl.pointer_type(tl.uint32)) + row[:, None] * (2 * NWH) + HIDX * NWH + tl.arange(0, NWH)[None, :]
    return tl.load(wp, mask=valid[:, None], other=0)


@triton.jit
def _field(w, I: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr):
    """Code ``I`` of every word as a float (``MODE``: see above)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if MODE == 2:  # the code to bits [19, 19 + BITS)
        if BITS * I <= 19:
            c = (w << (19 - BITS * I)) & (MASK << 19)
        else:
            c = (w >> (BITS * I - 19)) & (MASK << 19)
        return (c | 0x3F800000).to(tl.float32, bitcast=True)
    c = (w >> (BITS * I)) & MASK
    if MODE == 0:
        return (c | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        return (c | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _leaf(w, K: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr):
    """Codes ``K + 8 j`` of every word, joined on new minor axes (the most significant index of a word's code)."""
    if BITS == 4:
        return _field(w, K, BITS, MODE)
    elif BITS == 2:
        return tl.join(_field(w, K, BITS, MODE), _field(w, K + 8, BITS, MODE))
    else:
        return tl.join(tl.join(_field(w, K, BITS, MODE), _field(w, K + 16, BITS, MODE)),
                       tl.join(_field(w, K + 8, BITS, MODE), _field(w, K + 24, BITS, MODE)))


@triton.jit
def _unpack_words(w, BITS: tl.constexpr, MODE: tl.constexpr, N: tl.constexpr):
    """Words ``(N, W)`` -> ``(N, W * 32/BITS)`` floats of the codes (``_field``), in channel order: a tree of
    ``tl.join`` (register local; the first join is the most significant index) and one reshape."""
    W: tl.constexpr = w.shape[1]
    x = tl.join(tl.join(tl.join(_leaf(w, 0, BITS, MODE), _leaf(w, 4, BITS, MODE)),
                        tl.join(_leaf(w, 2, BITS, MODE), _leaf(w, 6, BITS, MODE))),
                tl.join(tl.join(_leaf(w, 1, BITS, MODE), _leaf(w, 5, BITS, MODE)),
                        tl.join(_leaf(w, 3, BITS, MODE), _leaf(w, 7, BITS, MODE))))
    return tl.reshape(x, (N, W * 32 // BITS))


@triton.jit
def _spread(x, BITS: tl.constexpr, N: tl.constexpr):
    """``(N, W)`` per-word values -> ``(N, W * 32/BITS)``, each repeated over its word's codes (``_unpack_words``'s
    layout: the joins copy registers)."""
    W: tl.constexpr = x.shape[1]
    y = x
    y = tl.join(y, y)
    y = tl.join(y, y)
    y = tl.join(y, y)
    if BITS <= 2:
        y = tl.join(y, y)
    if BITS == 1:
        y = tl.join(y, y)
    return tl.reshape(y, (N, W * 32 // BITS))


@triton.jit
def _nearest(x, MID, NM: tl.constexpr):
    """Count of codebook midpoints strictly below ``x`` (= nearest centroid of a sorted codebook)."""
    code = tl.zeros(x.shape, dtype=tl.int32)
    for j in tl.static_range(NM):
        code += (x > tl.load(MID + j)).to(tl.int32)
    return code


# ----------------------------------------------------------------------------------------------- pack / unpack
@triton.jit
def _pack_kernel(C, P, n_rows, BITS: tl.constexpr, D: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    c = tl.arange(0, D)
    codes = tl.load(C + r.to(tl.int64)[:, None] * D + c[None, :], mask=rmask[:, None], other=0).to(tl.int32)
    _store_codes(P, r.to(tl.int64) * NB, rmask, codes, BITS, D, BLOCK_R)


@triton.jit
def _unpack_kernel(P, C, n_rows, BITS: tl.constexpr, D: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    rp = P + r.to(tl.int64) * NB
    out = C + r.to(tl.int64)[:, None] * D + ch[None, :]
    c0 = _load_codes_half(rp, rmask, 0, BITS, D, BLOCK_R)
    tl.store(out, c0.to(tl.uint8), mask=rmask[:, None])
    c1 = _load_codes_half(rp, rmask, 1, BITS, D, BLOCK_R)
    tl.store(out + HALF, c1.to(tl.uint8), mask=rmask[:, None])


def pack_codes(codes: Tensor, bits: int, block_rows: int = 64) -> Tensor:
    """``codes (..., D)`` (values in ``[0, 2^bits)``) -> ``uint8 (..., D*bits/8)`` (Triton)."""
    d = codes.shape[-1]
    nb = packed_bytes(d, bits)
    c = codes.reshape(-1, d).to(torch.uint8).contiguous()
    out = torch.empty(c.shape[0], nb, dtype=torch.uint8, device=codes.device)
    if c.shape[0]:
        _pack_kernel[(cdiv(c.shape[0], block_rows),)](c, out, c.shape[0], bits, d, nb, block_rows)
    return out.reshape(*codes.shape[:-1], nb)


def unpack_codes(packed: Tensor, bits: int, head_dim: int, block_rows: int = 64) -> Tensor:
    """Inverse of ``pack_codes`` (Triton): ``uint8 (..., D*bits/8)`` -> ``uint8 (..., D)``."""
    nb = packed_bytes(head_dim, bits)
    if packed.shape[-1] != nb:
        raise ValueError(f"expected {nb} bytes per row, got {packed.shape[-1]}")
    p = packed.reshape(-1, nb).contiguous()
    out = torch.empty(p.shape[0], head_dim, dtype=torch.uint8, device=packed.device)
    if p.shape[0]:
        _unpack_kernel[(cdiv(p.shape[0], block_rows),)](p, out, p.shape[0], bits, head_dim, nb, block_rows)
    return out.reshape(*packed.shape[:-1], head_dim)


# ----------------------------------------------------------------------------------------------- kivi append
@triton.jit
def _kivi_append_kernel(
    K, V, skb, skh, skt, svb, svh, svt,
    KP, KS, KZ, VP, VS, VZ,
    H, Tn, Tmax, NGmax, offset,
    D: tl.constexpr, BITS: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    gi = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = gi * KG + tl.arange(0, KG)
    rmask = t < Tn
    c = tl.arange(0, D)
    row = pid_bh.to(tl.int64) * Tmax + offset + t
    NB: tl.constexpr = D * BITS // 8
    NL: tl.constexpr = (1 << BITS) - 1

    # ---- keys: one group of KG tokens, per channel
    k = tl.load(K + b * skb + h * skh + t[:, None] * skt + c[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    mn = tl.min(tl.where(rmask[:, None], k, float("inf")), axis=0)
    mx = tl.max(tl.where(rmask[:, None], k, -float("inf")), axis=0)
    z16 = mn.to(tl.float16)
    s16 = tl.math.div_rn(mx - mn, NL * 1.0).to(tl.float16)
    grow = pid_bh.to(tl.int64) * NGmax + offset // KG + gi
    tl.store(KS + grow * D + c, s16)
    tl.store(KZ + grow * D + c, z16)
    z = z16.to(tl.float32)[None, :]
    sc = s16.to(tl.float32)[None, :]
    q = tl.floor(tl.math.div_rn(k - z, tl.where(sc > 0, sc, 1.0)) + 0.5)
    codes = tl.minimum(tl.maximum(q, 0.0), NL * 1.0).to(tl.int32)
    _store_codes(KP, row * NB, rmask, codes, BITS, D, KG)

    # ---- values: per token, groups of VG channels
    NVG: tl.constexpr = D // VG
    v = tl.load(V + b * svb + h * svh + t[:, None] * svt + c[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    v3 = tl.reshape(v, (KG, NVG, VG))
    vmn = tl.min(v3, axis=2)
    vmx = tl.max(v3, axis=2)
    vz16 = vmn.to(tl.float16)
    vs16 = tl.math.div_rn(vmx - vmn, NL * 1.0).to(tl.float16)
    cg = tl.arange(0, NVG)
    tl.store(VS + row[:, None] * NVG + cg[None, :], vs16, mask=rmask[:, None])
    tl.store(VZ + row[:, None] * NVG + cg[None, :], vz16, mask=rmask[:, None])
    vz = vz16.to(tl.float32)[:, :, None]
    vs = vs16.to(tl.float32)[:, :, None]
    q3 = tl.floor(tl.math.div_rn(v3 - vz, tl.where(vs > 0, vs, 1.0)) + 0.5)
    vcodes = tl.reshape(tl.minimum(tl.maximum(q3, 0.0), NL * 1.0).to(tl.int32), (KG, D))
    _store_codes(VP, row * NB, rmask, vcodes, BITS, D, KG)


def quantize_append_kivi(cache: KIVICache, k: Tensor, v: Tensor, offset: int, num_warps: int = 4) -> None:
    """Quantize post-RoPE keys and values ``(B, H, Tn, D)`` into ``cache`` at token ``offset`` (a multiple of the
    group; keys get one scale/zero per channel per group of ``cache.group`` tokens, a partial last group its own).
    Does not change ``cache.n_packed``."""
    b, h, tn, d = k.shape
    tmax = cache.k_packed.shape[2]
    g = cache.group
    if offset % g:
        raise ValueError(f"kivi keys are appended a whole group of {g} tokens at a time")
    if offset + tn > tmax:
        raise ValueError(f"append of {tn} tokens at {offset} overflows {tmax}")
    check_head_dim(d, cache.bits)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    grid = (b * h, cdiv(tn, g))
    _kivi_append_kernel[grid](
        k, v, *k.stride()[:3], *v.stride()[:3],
        cache.k_packed, cache.k_scale, cache.k_zero, cache.v_packed, cache.v_scale, cache.v_zero,
        h, tn, tmax, cache.k_scale.shape[2], offset,
        D=d, BITS=cache.bits, KG=g, VG=value_group(d, g), num_warps=num_warps,
    )
