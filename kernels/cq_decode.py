"""Triton decode attention over a Coupled Quantization cache (layout and reference: ``kvq_kernels.vq_reference``).

One query token per sequence: ``q (B, H*G, D)`` post-RoPE. Grid ``(B*H, n_splits + 1)``, as
``decode_attention``: program ``(bh, s < n_splits)`` walks its chunk of packed tokens in blocks of ``BLOCK_N``;
for each half of the head it reads the codes of its ``NG/2`` channel groups from the bit-stream rows and
gathers the centroids ``cb[h, g, code]`` (``c`` channels each) from the head's codebook (``NG * 2^b * c``
entries, L2/L1 resident), so a token costs ``NG * b`` bits of HBM traffic per K or V. Pre-RoPE keys are
rotated on the fly exactly as ``decode_attention`` does for kvquant (the key by ``R(j)`` from a per-program
table, the query by ``-p0`` once per block). The G query heads of the KV head share every read. The last
program attends over the fp16 sink and residual; ``decode_attention``'s reduce kernel merges the partials
(``decode_split``: the building blocks of every split program, here with ``FMA``: float32 products on CUDA cores).

Layout requirements (``supported``): D, c and ``NG = D / c`` powers of two, ``NG >= 2`` (each half of the
head is whole channel groups, so rotate_half needs no shuffles).

Public function:
    decode_attention_cq(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None) -> out
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import decode_mma_cq
from .decode_attention import _finish, check_query, vq_plan
from .decode_split import (
    _fp16_segments,
    _init_state,
    _load_query,
    _mask,
    _program_ids,
    _rope_offsets,
    _rot_pos,
    _scores,
    _split_range,
    _store_partial,
    _update,
)
from .reference import next_pow2
from .vq_pack import _load_vq_codes, code_span
from .vq_reference import CQCache, row_bytes

#: GQA at head dim 128, 32 groups of 4 channels, 8-bit codes: the packed splits by ``decode_mma_cq``'s tensor-core
#: program
CQ_MMA = True


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def supported(head_dim: int, channels: int) -> bool:
    """Whether the kernel's layout holds a CQ configuration (see the module docstring)."""
    return _pow2(head_dim) and _pow2(channels) and head_dim // channels >= 2


@triton.jit
def _cq_half(row_ptr, valid, CB, h, HIDX: tl.constexpr, NG: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
             BITS: tl.constexpr, SPAN: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Channels of half ``HIDX`` of ``BLOCK_N`` tokens: the codes of groups ``[HIDX*NG/2, (HIDX+1)*NG/2)``
    looked up in head ``h``'s codebook ``CB (H, NG, K, C)`` -> float32 ``(BLOCK_N, D/2)``."""
    NH: tl.constexpr = NG // 2
    codes = _load_vq_codes(row_ptr, valid, HIDX * NH, NH, BITS, SPAN, NB, BLOCK_N)  # (BLOCK_N, NH)
    g = HIDX * NH + tl.arange(0, NH)
    off = ((h * NG + g)[None, :] * K + codes)[:, :, None] * C + tl.arange(0, C)[None, None, :]
    return tl.reshape(tl.load(CB + off).to(tl.float32), (BLOCK_N, NH * C))


@triton.jit
def _cq_split_kernel(
    Q, sqb, sqh, KC, VC, CK, CV,
    SK, SV, RK, RV, ssb, ssh, srb, srh,
    INVF, MP, LP, AP,
    H, Tmax, n_packed, n_sink, n_res, tokens_per_split, NSP, qk_scale, LENS,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
    SPAN: tl.constexpr, NB: tl.constexpr, ROPE: tl.constexpr, BLOCK_N: tl.constexpr, SEG_ONLY: tl.constexpr = False,
    DYN: tl.constexpr = False,
):
    """One program per (b, KV head) and split: query rows ``(GP, D/2)``, centroid tiles ``(BLOCK_N, D/2)``.
    ``SEG_ONLY``: launched with one split, the last (the fp16 segments; ``decode_mma_cq`` does the packed ones).
    ``DYN``: the counts read from ``LENS`` (``decode_split._counts``)."""
    HALF: tl.constexpr = D // 2
    K: tl.constexpr = 1 << BITS
    b, h, hq0, sp, prow0 = _program_ids(H, NSP, G, G, SEG_ONLY)
    q1, q2 = _load_query(Q, sqb, sqh, b, hq0, qk_scale, G, GP, D)
    invf, cj, sj = _rope_offsets(INVF, BLOCK_N, HALF)  # R(j), j < BLOCK_N (unused without ROPE)
    m, l, pm, acc1, acc2 = _init_state(GP, BLOCK_N, HALF, 1, True)
    npk, nrs, start, end = _split_range(LENS, n_packed, n_res, tokens_per_split, NSP, sp, BLOCK_N, DYN)
    bh = (b * H + h).to(tl.int64)
    if not SEG_ONLY:  # a segment-only launch compiles without the packed loop
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            valid = t < end
            row = bh * Tmax + t
            kp = KC + row * NB
            k1 = _cq_half(kp, valid, CK, h, 0, NG, K, C, BITS, SPAN, NB, BLOCK_N)
            k2 = _cq_half(kp, valid, CK, h, 1, NG, K, C, BITS, SPAN, NB, BLOCK_N)
            if ROPE:
                qr1, qr2 = _rot_pos(q1, q2, invf, n_sink + t0)
                s = _scores(qr1, qr2, k1 * cj - k2 * sj, k2 * cj + k1 * sj, True, "ieee", FMA=True)
            else:
                s = _scores(q1, q2, k1, k2, True, "ieee", FMA=True)
            s = _mask(s, valid, True)
            vp = VC + row * NB
            v1 = _cq_half(vp, valid, CV, h, 0, NG, K, C, BITS, SPAN, NB, BLOCK_N)
            v2 = _cq_half(vp, valid, CV, h, 1, NG, K, C, BITS, SPAN, NB, BLOCK_N)
            m, l, pm, acc1, acc2 = _update(s, v1, v2, m, l, pm, acc1, acc2, True, "ieee", FMA=True)
    m, l, pm, acc1, acc2 = _fp16_segments(q1, q2, SK, SV, RK, RV, b.to(tl.int64) * ssb + h * ssh,
                                          b.to(tl.int64) * srb + h * srh, sp == NSP - 1, n_sink, npk, nrs, invf, Q, 0,
                                          cj, sj, m, l, pm, acc1, acc2, ROPE, D, BLOCK_N, True, "ieee", FMA=True)
    _store_partial(MP, LP, AP, prow0, NSP, m, l, acc1, acc2, G, GP, D, True)


def decode_attention_cq(q: Tensor, cache: CQCache, sm_scale: float | None = None, num_splits: int | None = None,
                        block_n: int | None = None, num_warps: int | None = None, lens: Tensor | None = None) -> Tensor:
    """Decode attention of post-RoPE ``q (B, H*G, D)`` over a ``CQCache`` -> ``(B, H*G, D)`` in q's dtype. With
    ``CQ_MMA`` (and no ``block_n`` / ``num_splits`` asked for) the packed splits run ``decode_mma_cq``'s tensor-core
    program where it supports the cache (``cq_mma_supported``), and this one the fp16 segments. ``lens``: int64
    ``[n_packed, n_res, ...]`` on the device, read by the kernels instead of the cache's counts (a launch captured in
    a CUDA graph; the split plan covers the capacity)."""
    b, h, tmax, nb = cache.k_codes.shape
    d, ng, c = cache.head_dim, cache.groups, cache.ck.shape[-1]
    if not supported(d, c) or nb != row_bytes(ng, cache.bits) or cache.v_codes.shape != cache.k_codes.shape:
        raise ValueError(f"cq layout not supported by the kernel: head_dim {d}, {c} channels per group, rows {nb} B")
    g = check_query(q, h, d)
    gp = next_pow2(g)
    mma = CQ_MMA and num_splits is None and block_n is None and decode_mma_cq.cq_mma_supported(q, cache)
    if block_n is None:  # the centroid gather tile is (BLOCK_N, D/2), the score tile (GP, BLOCK_N, D/2)
        block_n = max(16, min(64, 4096 // (gp * d // 2)))
    if num_warps is None:
        num_warps = 8 if gp * block_n * d >= 16384 else 4
    dyn = lens is not None
    per, nsp, partials, scale = vq_plan(q, cache, mma, decode_mma_cq.cq_split, block_n, num_splits, sm_scale, lens)
    if mma:
        decode_mma_cq.launch_cq_mma(q, cache, *partials, per, nsp, scale, lens)
    invf = decode_mma_cq.cq_frequencies(cache, q.device)
    sk, rk = cache.sink_k, cache.res_k
    _cq_split_kernel[(b * h, 1 if mma else nsp)](
        q, q.stride(0), q.stride(1), cache.k_codes, cache.v_codes, cache.ck.contiguous(), cache.cv.contiguous(),
        sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1), rk.stride(0), rk.stride(1),
        invf, *partials,
        h, tmax, cache.n_packed, cache.n_sink, cache.n_res, per, nsp, scale, lens if dyn else q,
        G=g, GP=gp, D=d, NG=ng, C=c, BITS=cache.bits, SPAN=code_span(cache.bits), NB=nb, ROPE=cache.pre_rope,
        BLOCK_N=block_n, SEG_ONLY=mma, DYN=dyn, num_warps=num_warps,
    )
    return _finish(q, nsp, *partials)
