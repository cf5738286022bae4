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

Keys are stored post-RoPE, so no rotation. 8-bit codes are plain bytes (``decode_split._codes`` bytewise). ``int``
codes of 1, 2 or 4 bits are read as 32-bit words and made floats by bit tricks (``_token_words_loop``). On a GPU,
2- and 4-bit ``int`` GQA at head dim 128 runs ``decode_mma``'s Gluon program for the packed splits (``TOKEN_MMA``).

Public function:
    decode_attention_token(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None, lens=None)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import decode_mma, decode_mma_nf
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
from .pack import MAGIC_F16, MAGIC_F32, UNIT_SCALE, _unpack_words, _words, words_supported
from .token_reference import TokenCache, check_token_bits

#: ``int`` codes read as 32-bit words and made floats by bit tricks (``_token_words_loop``) where the halves are
#: whole words; with the next block's loads in flight in the one-row (MHA) programs
TOKEN_WORDS = True
TOKEN_PREFETCH = True
#: GQA over 2- and 4-bit ``int`` codes at head dim 128 on a CUDA GPU by ``decode_mma``'s Gluon program (both
#: tensor-core operands made in registers; this module's program does the fp16 segments); a caller's ``block_n``
#: keeps the ``tl.dot`` programs
TOKEN_MMA = True
#: GQA over 2- and 4-bit ``nf`` codes (a level table, no zero) at head dim 128 by ``decode_mma_nf``'s Gluon program
#: (H200, 128K: nf2 1.77x fp16 SDPA against the ``tl.dot`` program's 0.56x; ``kernels-decode-attention.md``)
NF_MMA = True


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
    return _scale_rows(p, tl.load(X + row, mask=valid, other=0.0), DOT)


@triton.jit
def _token_word_loads(KP, KS, KZ, VP, VS, VZ, bh, Tmax, t0, end, D: tl.constexpr, BITS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """One block's reads, raw: key and value words ``(N, W)`` per half and the per-token statistics ``(N,)``."""
    t = t0 + tl.arange(0, BLOCK_N)
    valid = t < end
    row = bh * Tmax + t
    return (_words(KP, row, valid, 0, BITS, D), _words(KP, row, valid, 1, BITS, D),
            _words(VP, row, valid, 0, BITS, D), _words(VP, row, valid, 1, BITS, D),
            tl.load(KS + row, mask=valid, other=0.0), tl.load(KZ + row, mask=valid, other=0.0),
            tl.load(VS + row, mask=valid, other=0.0), tl.load(VZ + row, mask=valid, other=0.0))


@triton.jit
def _token_words_loop(q1, q2, qsum, KP, KS, KZ, VP, VS, VZ, bh, Tmax, start, end, m, l, pm, acc1, acc2,
                      D: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
                      PREC: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr):
    """The packed blocks ``[start, end)`` of an ``int`` cache (zero points, no level table; ``qsum``: the query's
    sum, ``(MR, 1)`` or a scalar) with codes read as words (``pack._unpack_words``), no conversion instruction per
    element (as ``decode_split._kivi_words_loop``):

    * fp16 dots: ``1024 + code`` tiles straight into the dots; the scores' offset ``1024 sum(q)`` is taken off once
      per block row, the values' ``1024 sum_t (p s)_t`` goes into ``pm`` with ``sum_t p_t z_t``;
    * one row: ``x = 1 + code/16`` against ``16 q`` (less ``sum(16 q)``) and ``16 p s`` per token (``p (z - 16 s)``
      into ``pm``); ``PREFETCH``: the next block's loads issued before this block's math;
    * float32 dots: ``2^23 + code`` minus ``2^23``. -> the updated softmax state."""
    H16: tl.constexpr = DOT and F16
    MODE: tl.constexpr = 0 if H16 else (1 if DOT else 2)
    if H16:
        qa1 = q1.to(tl.float16)
        qa2 = q2.to(tl.float16)
        qoff = MAGIC_F16 * (tl.sum(qa1.to(tl.float32), axis=1) + tl.sum(qa2.to(tl.float32), axis=1))[:, None]
    elif DOT:
        qa1 = q1
        qa2 = q2
        qoff = 0.0
    else:
        qa1 = q1 * UNIT_SCALE
        qa2 = q2 * UNIT_SCALE
        qoff = tl.sum(tl.sum(qa1 + qa2, axis=1), axis=0)
    kw1, kw2, vw1, vw2, ks, kz, vs, vz = _token_word_loads(KP, KS, KZ, VP, VS, VZ, bh, Tmax, start, end, D, BITS,
                                                           BLOCK_N)
    for t0 in range(start, end, BLOCK_N):
        valid = t0 + tl.arange(0, BLOCK_N) < end
        if PREFETCH:
            nkw1, nkw2, nvw1, nvw2, nks, nkz, nvs, nvz = _token_word_loads(KP, KS, KZ, VP, VS, VZ, bh, Tmax,
                                                                           t0 + BLOCK_N, end, D, BITS, BLOCK_N)
        else:
            kw1, kw2, vw1, vw2, ks, kz, vs, vz = _token_word_loads(KP, KS, KZ, VP, VS, VZ, bh, Tmax, t0, end, D,
                                                                   BITS, BLOCK_N)
        e1 = _unpack_words(kw1, BITS, MODE, BLOCK_N)
        e2 = _unpack_words(kw2, BITS, MODE, BLOCK_N)
        if DOT and not H16:
            e1 = e1 - MAGIC_F32
            e2 = e2 - MAGIC_F32
        raw = _scores(qa1, qa2, e1, e2, DOT, PREC, F16) - qoff
        s = _scale_rows(raw, ks, DOT) + _scale_rows(qsum, kz, DOT)
        p, m, l, pm, acc1, acc2 = _softmax(_mask(s, valid, DOT), m, l, pm, acc1, acc2, DOT)
        f1 = _unpack_words(vw1, BITS, MODE, BLOCK_N)
        f2 = _unpack_words(vw2, BITS, MODE, BLOCK_N)
        if H16:
            ps = _scale_rows(p, vs, DOT).to(tl.float16)
            acc1, acc2 = _accumulate(ps, f1, f2, acc1, acc2, DOT, PREC, F16)
            pm += tl.sum(_scale_rows(p, vz, DOT) - MAGIC_F16 * ps.to(tl.float32), axis=1)[:, None]
        elif DOT:
            acc1, acc2 = _accumulate(_scale_rows(p, vs, DOT), f1 - MAGIC_F32, f2 - MAGIC_F32, acc1, acc2, DOT, PREC,
                                     F16)
            pm += tl.sum(_scale_rows(p, vz, DOT), axis=1)[:, None]
        else:
            pu = (p * UNIT_SCALE * vs.to(tl.float32))[:, None]
            acc1 += pu * f1
            acc2 += pu * f2
            pm += (p * (vz.to(tl.float32) - UNIT_SCALE * vs.to(tl.float32)))[:, None]
        if PREFETCH:
            kw1, kw2, vw1, vw2, ks, kz, vs, vz = nkw1, nkw2, nvw1, nvw2, nks, nkz, nvs, nvz
    return m, l, pm, acc1, acc2


@triton.jit
def _scale_rows(x, st, DOT: tl.constexpr):
    """``x * st`` with per-token statistics ``st (N,)`` (fp16): ``x (MR, N)`` (``DOT``) or ``(N,)``; a scalar or
    ``(MR, 1)`` ``x`` broadcasts."""
    if DOT:
        return x * st.to(tl.float32)[None, :]
    else:
        return x * st.to(tl.float32)


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
    WORDS: tl.constexpr = False, PREFETCH: tl.constexpr = False, SEG_ONLY: tl.constexpr = False,
):
    """``ZERO``: the cache has zero points (``KZ``, ``VZ``); ``LUT``: codes index the level table ``L``. ``DYN``: the
    packed and residual counts are read from ``LENS`` (as the kivi kernel: a graph-captured launch). ``WORDS``
    (``int`` caches: zero points, no level table): ``_token_words_loop``. ``SEG_ONLY``: launched with one split, it
    is the last one (the fp16 segments; ``decode_mma`` does the packed splits)."""
    HALF: tl.constexpr = D // 2
    b, h, hq0, sp, prow0 = _program_ids(H, NSP, G, QPP, SEG_ONLY)
    q1, q2 = _load_query(Q, sqb, sqh, b, hq0, qk_scale, QPP, MR, D)
    if DOT:
        qsum = (tl.sum(q1, axis=1) + tl.sum(q2, axis=1))[:, None]  # (MR, 1)
    else:
        qsum = tl.sum(tl.sum(q1 + q2, axis=1), axis=0)
    m, l, pm, acc1, acc2 = _init_state(MR, BLOCK_N, HALF, 1, DOT)
    npk, nrs, start, end = _split_range(LENS, n_packed, n_res, tokens_per_split, NSP, sp, BLOCK_N, DYN)
    bh = (b * H + h).to(tl.int64)
    if WORDS:
        m, l, pm, acc1, acc2 = _token_words_loop(q1, q2, qsum, KP, KS, KZ, VP, VS, VZ, bh, Tmax, start, end, m, l,
                                                 pm, acc1, acc2, D, BITS, BLOCK_N, DOT, PREC, F16, PREFETCH)
    else:
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
    mma = TOKEN_MMA and block_n is None and decode_mma.mma_supported(q, cache)
    nf = not mma and NF_MMA and block_n is None and decode_mma_nf.nf_mma_supported(q, cache)
    split = decode_mma.mma_split(q, cache, lens) if mma else decode_mma_nf.nf_split(q, cache, lens) if nf else None
    grid, per, nsp, mp, lp, ap, scale, meta = _launch_plan(q, cache, sm_scale, num_splits, block_n, num_warps, False,
                                                           dyn, split)
    meta["PLAIN"] = meta["PLAIN"] or cache.bits == 8  # plain bytes: no join-tree expansion
    if mma:  # the packed splits by a Gluon program; this one does the fp16 segments
        decode_mma.launch_mma(q, cache, mp, lp, ap, per, nsp, scale, lens)
    elif nf:
        decode_mma_nf.launch_nf_mma(q, cache, mp, lp, ap, per, nsp, scale, lens)
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
        BITS=cache.bits, ZERO=zero, LUT=cache.levels is not None, DYN=dyn,
        WORDS=TOKEN_WORDS and zero and cache.levels is None and words_supported(cache.head_dim, cache.bits)
        and not meta["PLAIN"], PREFETCH=TOKEN_PREFETCH and not meta["DOT"], SEG_ONLY=mma or nf, **meta,
    )
    return _finish(q, nsp, mp, lp, ap)
