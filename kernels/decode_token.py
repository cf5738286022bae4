"""Triton split-K decode attention over a per-token-vector quantized cache (kvq's ``int`` and ``nf``; layout and
reference: ``kvq_kernels.token_reference``).

The programs are ``decode_split``'s (grid ``(B*H*G/QPP, n_splits + 1)``, the last split doing the fp16 sink and
residual, partials merged by ``decode_attention``'s reduce kernel) with one dequantization: a packed entry is
``z + s * L[code]`` with one fp16 scale ``s`` and zero ``z`` per token-head and a ``2^b``-entry level table ``L``
(int: the codes themselves, no table; nf: the NormalFloat codebook, no zero). Both are folded out of the tile:

* scores: ``q . k_t = s_t (q . L[codes_t]) + z_t sum(q)``: one tile of levels per block, a scale and a zero per
  token;
* values: ``sum_t p_t v_t = sum_t (p_t s_t) L[codes_t] + sum_t p_t z_t``: the value tile weighted by ``p s``, and
  one running sum of ``p z`` per query row (the extra per-token state ``pm`` the softmax rescales), added to every
  channel at the end.

Keys are stored post-RoPE, so no rotation. 8-bit codes are plain bytes (``decode_split._codes`` bytewise).

Public function:
    decode_attention_token(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None, lens=None)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .decode_attention import _finish, _launch_plan
from .decode_split import (
    _accumulate,
    _codes,
    _fp16_segments,
    _init_state,
    _load_query,
    _lut,
    _mask,
    _program_ids,
    _scores,
    _softmax,
    _split_range,
    _store_partial,
)
from .token_reference import TokenCache, check_token_bits


@triton.jit
def _levels(P, L, row, valid, HIDX: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
            LUT: tl.constexpr, ASM: tl.constexpr, PLAIN: tl.constexpr):
    """``L[code]`` ``(N, D/2)`` float32 of half ``HIDX`` of ``N`` packed rows (``LUT`` False: the codes)."""
    NB: tl.constexpr = D * BITS // 8
    c = _codes(P + row * NB, valid, HIDX, BITS, D, N, PLAIN)
    if LUT:
        return _lut(L, c, ASM)
    else:
        return c.to(tl.float32)


@triton.jit
def _per_token(X, row, valid, p, DOT: tl.constexpr):
    """``p * X[row]`` per token (fp16 statistics, 0 past the end): ``(N,)`` for one row, ``(MR, N)`` for ``p``'s rows
    (``p`` a scalar 1.0: the statistics alone, as a row)."""
    x = tl.load(X + row, mask=valid, other=0.0).to(tl.float32)
    if DOT:
        return p * x[None, :]
    else:
        return p * x


@triton.jit
def _token_split_kernel(
    Q, sqb, sqh,
    KP, KS, KZ, VP, VS, VZ, L,
    SK, SV, RK, RV, ssb, ssh, srb, srh,
    MP, LP, AP,
    H, Tmax, n_packed, n_sink, n_res, tokens_per_split, NSP, qk_scale, LENS,
    G: tl.constexpr, QPP: tl.constexpr, MR: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ASM: tl.constexpr, ZERO: tl.constexpr,
    LUT: tl.constexpr, PLAIN: tl.constexpr = False, DYN: tl.constexpr = False, F16: tl.constexpr = False,
):
    """``ZERO``: the cache has zero points (``KZ``, ``VZ``); ``LUT``: codes index the level table ``L``. ``DYN``: the
    packed and residual counts are read from ``LENS`` (as the kivi kernel: a graph-captured launch)."""
    HALF: tl.constexpr = D // 2
    b, h, hq0, sp, prow0 = _program_ids(H, NSP, G, QPP)
    q1, q2 = _load_query(Q, sqb, sqh, b, hq0, qk_scale, QPP, MR, D)
    if DOT:
        qsum = (tl.sum(q1, axis=1) + tl.sum(q2, axis=1))[:, None]  # (MR, 1)
    else:
        qsum = tl.sum(tl.sum(q1 + q2, axis=1), axis=0)
    m, l, pm, acc1, acc2 = _init_state(MR, BLOCK_N, HALF, 1, DOT)
    npk, nrs, start, end = _split_range(LENS, n_packed, n_res, tokens_per_split, NSP, sp, BLOCK_N, DYN)
    bh = (b * H + h).to(tl.int64)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        row = bh * Tmax + t
        x1 = _levels(KP, L, row, valid, 0, BITS, D, BLOCK_N, LUT, ASM, PLAIN)
        x2 = _levels(KP, L, row, valid, 1, BITS, D, BLOCK_N, LUT, ASM, PLAIN)
        s = _per_token(KS, row, valid, _scores(q1, q2, x1, x2, DOT, PREC, F16), DOT)
        if ZERO:
            s += _per_token(KZ, row, valid, qsum, DOT)
        p, m, l, pm, acc1, acc2 = _softmax(_mask(s, valid, DOT), m, l, pm, acc1, acc2, DOT)
        y1 = _levels(VP, L, row, valid, 0, BITS, D, BLOCK_N, LUT, ASM, PLAIN)
        y2 = _levels(VP, L, row, valid, 1, BITS, D, BLOCK_N, LUT, ASM, PLAIN)
        acc1, acc2 = _accumulate(_per_token(VS, row, valid, p, DOT), y1, y2, acc1, acc2, DOT, PREC, F16)
        if ZERO:  # sum_t p_t z_t: (MR, 1), or per token (N, 1) for one row
            pz = _per_token(VZ, row, valid, p, DOT)
            if DOT:
                pm += tl.sum(pz, axis=1)[:, None]
            else:
                pm += pz[:, None]
    m, l, pm, acc1, acc2 = _fp16_segments(q1, q2, SK, SV, RK, RV, b.to(tl.int64) * ssb + h * ssh,
                                          b.to(tl.int64) * srb + h * srh, sp == NSP - 1, n_sink, npk, nrs, q1, Q, 0,
                                          q1, q1, m, l, pm, acc1, acc2, False, D, BLOCK_N, DOT, PREC, F16)
    if DOT:
        _store_partial(MP, LP, AP, prow0, NSP, m, l, acc1 + pm, acc2 + pm, QPP, MR, D, DOT)
    else:
        extra = tl.sum(tl.sum(pm, axis=1), axis=0)
        _store_partial(MP, LP, AP, prow0, NSP, m, l, tl.sum(acc1, axis=0) + extra, tl.sum(acc2, axis=0) + extra,
                       QPP, MR, D, DOT)


def _check(cache: TokenCache) -> None:
    """The buffers the kernel indexes by ``(b, h, token)``: contiguous, one capacity, fp16 statistics."""
    check_token_bits(cache.head_dim, cache.bits)
    shape = cache.k_packed.shape[:3]
    stats = [x for x in (cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero) if x is not None]
    if (cache.k_zero is None) != (cache.v_zero is None):
        raise ValueError("keys and values must both have zero points or neither")
    if cache.v_packed.shape != cache.k_packed.shape or any(x.shape != shape or x.dtype != torch.float16
                                                           for x in stats):
        raise ValueError(f"codes (B, H, Tmax, nb) and fp16 statistics (B, H, Tmax) of one capacity, got "
                         f"{[tuple(x.shape) for x in (cache.k_packed, cache.v_packed, *stats)]}")
    if not all(x.is_contiguous() for x in (cache.k_packed, cache.v_packed, *stats)):
        raise ValueError("packed codes and statistics must be contiguous")
    if cache.levels is not None and (cache.levels.shape != (1 << cache.bits,) or cache.levels.dtype != torch.float32
                                     or not cache.levels.is_contiguous()):
        raise ValueError(f"levels must be a contiguous float32 table of {1 << cache.bits} entries")


def decode_attention_token(q: Tensor, cache: TokenCache, sm_scale: float | None = None,
                           num_splits: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, lens: Tensor | None = None) -> Tensor:
    """Decode attention of post-RoPE ``q (B, H*G, D)`` over a ``TokenCache`` -> ``(B, H*G, D)`` in q's dtype.

    ``lens``: int ``[n_packed, n_res, ...]`` on the device, read by the kernel instead of the cache's counts (one
    launch, captured once in a CUDA graph, stays right as the cache grows; its split plan covers the capacity)."""
    _check(cache)
    dyn = lens is not None
    grid, per, nsp, mp, lp, ap, scale, meta = _launch_plan(q, cache, sm_scale, num_splits, block_n, num_warps, False,
                                                           dyn)
    meta["PLAIN"] = meta["PLAIN"] or cache.bits == 8  # plain bytes: no join-tree expansion
    zero = cache.k_zero is not None
    sk, rk = cache.sink_k, cache.res_k
    _token_split_kernel[grid](
        q, q.stride(0), q.stride(1),  # (q: a placeholder for buffers the kernel does not read)
        cache.k_packed, cache.k_scale, cache.k_zero if zero else q, cache.v_packed, cache.v_scale,
        cache.v_zero if zero else q, q if cache.levels is None else cache.levels,
        sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1), rk.stride(0), rk.stride(1),
        mp, lp, ap,
        cache.k_packed.shape[1], cache.k_packed.shape[2], cache.n_packed, cache.n_sink, cache.n_res, per, nsp, scale,
        lens if dyn else q,
        BITS=cache.bits, ZERO=zero, LUT=cache.levels is not None, DYN=dyn, **meta,
    )
    return _finish(q, nsp, mp, lp, ap)
