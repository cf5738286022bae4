"""The split-K programs behind ``decode_attention``, ``decode_token``, ``cq_decode`` and ``pq_decode``, and the
building blocks they share (layout: ``kvq_kernels.reference``; wrappers there).

Grid ``(B*H*G/QPP, n_splits + 1)``: a program takes ``QPP`` query heads of one KV head and one chunk of the
packed tokens (the last split does the fp16 sink and residual instead, ``_fp16_segments``), walks it in blocks of
``BLOCK_N`` tokens and writes its running max / sum / unnormalized output (log2 domain) for the reduce kernel:
``m, l (B*Hq, NSP)`` and ``acc (B*Hq, NSP, D)`` float32, row ``b*Hq + query head``. Query, key and value tiles
are halves ``(rows, D/2)``: RoPE's rotate_half pairs channel i with i + D/2.

Three ways to consume a dequantized block, all with the same dequantization:
* ``DOT=False`` (one query head per program, MHA): CUDA-core 2-D tiles. The value product is *deferred*: the
  accumulators are ``(BLOCK_N, D/2)`` tiles (one FMA per element, reduced over tokens once at the end), and
  the softmax max is rescaled lazily (only when a block's max exceeds the running one by ``2^8``), so the
  per-element work is unpack + codebook load + a few FMAs.
* ``DOT=True`` (G > 1 query heads per KV head, padded to ``MR >= 16`` rows): ``tl.dot`` for scores and values.
* ``DOT=True, FMA=True`` (the ``cq`` / ``pq`` programs: all G query heads of a KV head, padded to ``MR`` a power of
  two, possibly 1): the rows of ``DOT``, but the products broadcast to ``(MR, BLOCK_N, D/2)`` and summed on CUDA
  cores in float32, the softmax rescaled every block, and RoPE angles ``p * inv_freq`` taken on the device.

kivi and int codes may instead be read as 32-bit words and made floats by bit tricks (``pack._unpack_words``:
no int-to-float conversion per element), with the next block's loads in flight in the one-row programs
(``_kivi_words_loop``, ``decode_token._token_words_loop``).

kvquant keys are pre-RoPE: a key at position ``p0 + j`` (``p0`` a block start, a multiple of ``BLOCK_N`` past
the segment origin) is ``R(j) (a + s x)`` with ``x`` the codebook value, so per program six ``(BLOCK_N, D/2)``
tables fold the per-channel affine map and ``R(j)`` (``kr = TA + TB x_same - / + TC x_other``: four FMAs per
channel pair), and the query is rotated by ``R(p0)^T`` once per block, with ``cos / sin(p0 inv_freq)`` read
from a host table (exact angles; no large-argument ``sin``/``cos`` on the device).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pack import MAGIC_F16, MAGIC_F32, UNIT_SCALE, _code_bytes, _load_codes_half, _spread, _unpack_words, _words

#: split programs per SM the default plan of the cq / pq wrappers aims for (one program per sequence and KV head;
#: ``decode_attention.PROGRAMS_PER_SM`` is the others')
VQ_PROGRAMS_PER_SM = 4


# ----------------------------------------------------------------------------------------------- small helpers
@triton.jit
def _codes(row_ptr, rmask, HIDX: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
           PLAIN: tl.constexpr = False):
    """Codes ``(R, D/2)`` int32 of half ``HIDX`` (layout: ``pack._load_codes_half``).

    Default: one vector load per plane, expanded by ``tl.join`` trees (the fastest on the H100). With ``PLAIN``
    and always at 3 bits: one byte load per code and plane (L1 hits), so every tile is in a plain blocked
    layout. Triton 3.6 mis-compiles the join-tree layouts on the H100 when they meet ``tl.dot`` at
    ``BLOCK_N = 16`` or ``D = 32`` (measured: relative errors 0.08-2.9 against the reference), and when the
    two 3-bit planes' trees are OR-ed; ``decode_attention.plain_codes`` says when to ask for it."""
    if BITS == 3 or PLAIN:
        c = HIDX * (D // 2) + tl.arange(0, D // 2)
        return _code_bytes(row_ptr[:, None], c[None, :], rmask[:, None], BITS, D)
    else:
        return _load_codes_half(row_ptr, rmask, HIDX, BITS, D, R)


@triton.jit
def _rot_t(x1, x2, c, s):
    """``R^T x`` for rotate_half pairs: the query side of ``q . R k = (R^T q) . k``."""
    return x1 * c + x2 * s, x2 * c - x1 * s


@triton.jit
def _table_row(TAB, tab_rows, r, HALF: tl.constexpr):
    """``cos, sin (r * BLOCK_N * inv_freq)`` from the host table ``(2, tab_rows, D/2)``."""
    ch = tl.arange(0, HALF)
    return tl.load(TAB + r * HALF + ch)[None, :], tl.load(TAB + (tab_rows + r) * HALF + ch)[None, :]


@triton.jit
def _rot_pos(q1, q2, invf, p):
    """``R(p)^T q`` with the angles ``p * inv_freq`` (``invf (1, D/2)``) taken on the device in float32."""
    ang = invf * p
    return _rot_t(q1, q2, tl.cos(ang), tl.sin(ang))


@triton.jit
def _rope_offsets(INVF, BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """``inv_freq (1, D/2)`` and the in-block RoPE table ``cos, sin (j * inv_freq)`` ``(BLOCK_N, D/2)``, j < BLOCK_N."""
    invf = tl.load(INVF + tl.arange(0, HALF))[None, :]
    ang = tl.arange(0, BLOCK_N).to(tl.float32)[:, None] * invf  # small angles: R(j), j < BLOCK_N
    return invf, tl.cos(ang), tl.sin(ang)


@triton.jit
def _load_query(Q, sqb, sqh, b, hq0, qk_scale, QPP: tl.constexpr, MR: tl.constexpr, D: tl.constexpr):
    """Rows ``hq0 .. hq0+QPP-1`` of ``q`` (zero rows up to ``MR``), scaled, as halves ``(MR, D/2)``."""
    HALF: tl.constexpr = D // 2
    g = tl.arange(0, MR)
    ch = tl.arange(0, HALF)
    qp = Q + b * sqb + (hq0 + g)[:, None] * sqh + ch[None, :]
    q1 = tl.load(qp, mask=(g < QPP)[:, None], other=0.0).to(tl.float32) * qk_scale
    q2 = tl.load(qp + HALF, mask=(g < QPP)[:, None], other=0.0).to(tl.float32) * qk_scale
    return q1, q2


@triton.jit
def _scores(q1, q2, k1, k2, DOT: tl.constexpr, PREC: tl.constexpr, F16: tl.constexpr = False,
            FMA: tl.constexpr = False):
    """``q (MR, D/2)`` halves against key halves ``(N, D/2)``: ``(N,)`` for one row, else ``(MR, N)``.
    ``F16``: the dot's operands rounded to fp16 (tensor-core fp16 MMA, float32 accumulation); 2 or more: the key
    tile as the MMA's first operand, the query's rows as its columns (``decode_attention.SWAP_AB``). ``FMA``: float32
    products ``(MR, N, D/2)`` summed over channels, per half."""
    if FMA:
        return tl.sum(q1[:, None, :] * k1[None, :, :], axis=2) + tl.sum(q2[:, None, :] * k2[None, :, :], axis=2)
    elif DOT and F16 >= 2:  # swapped operands (``decode_attention.SWAP_AB``): the key tile is the MMA's A, (N, MR)
        st = tl.dot(k1.to(tl.float16), tl.trans(q1.to(tl.float16)))
        return tl.trans(tl.dot(k2.to(tl.float16), tl.trans(q2.to(tl.float16)), st))
    elif DOT and F16:
        s = tl.dot(q1.to(tl.float16), tl.trans(k1.to(tl.float16)))
        return tl.dot(q2.to(tl.float16), tl.trans(k2.to(tl.float16)), s)
    elif DOT:
        return tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
    else:
        return tl.sum(q1 * k1 + q2 * k2, axis=1)


@triton.jit
def _softmax(s, m, l, pm, acc1, acc2, DOT: tl.constexpr, FMA: tl.constexpr = False):
    """Online softmax with a lazy max: rescale the state only when a block's max exceeds it by 2^8 (``FMA``: at
    every block, to the running max).

    One row (``DOT=False``): ``s (N,)``, ``m`` scalar, ``l, pm (N,)`` and ``acc (N, D/2)`` deferred per token.
    Several rows: ``s (MR, N)``, ``m, l (MR,)``, ``pm (MR, NPM)``, ``acc (MR, D/2)``. Returns ``p`` and the updated
    state (``acc`` rescaled; ``_accumulate`` adds the block)."""
    if FMA:
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        pm = pm * alpha[:, None]
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        m = m_new
    elif DOT:
        mb = tl.max(s, axis=1)
        if tl.max(mb - m, axis=0) > 8.0:
            m_new = tl.maximum(m, mb)
            alpha = tl.exp2(m - m_new)
            l = l * alpha
            pm = pm * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            acc2 = acc2 * alpha[:, None]
            m = m_new
        p = tl.exp2(s - m[:, None])
        l = l + tl.sum(p, axis=1)
    else:
        mb = tl.max(s, axis=0)
        if mb > m + 8.0:
            alpha = tl.exp2(m - mb)
            l = l * alpha
            pm = pm * alpha
            acc1 = acc1 * alpha
            acc2 = acc2 * alpha
            m = mb
        p = tl.exp2(s - m)
        l = l + p
    return p, m, l, pm, acc1, acc2


@triton.jit
def _accumulate(p, v1, v2, acc1, acc2, DOT: tl.constexpr, PREC: tl.constexpr, F16: tl.constexpr = False,
                FMA: tl.constexpr = False):
    """``acc += p v`` with value halves ``(N, D/2)``: ``p (MR, N)`` into ``acc (MR, D/2)``, or one row's ``p (N,)``
    into the deferred ``acc (N, D/2)``."""
    if FMA:
        return (acc1 + tl.sum(p[:, :, None] * v1[None, :, :], axis=1),
                acc2 + tl.sum(p[:, :, None] * v2[None, :, :], axis=1))
    elif DOT and F16 >= 3:  # swapped: ``acc^T += v^T p^T``, the value tile as the MMA's A
        pt = tl.trans(p.to(tl.float16))
        return (acc1 + tl.trans(tl.dot(tl.trans(v1.to(tl.float16)), pt)),
                acc2 + tl.trans(tl.dot(tl.trans(v2.to(tl.float16)), pt)))
    elif DOT and F16:
        p16 = p.to(tl.float16)
        return tl.dot(p16, v1.to(tl.float16), acc1), tl.dot(p16, v2.to(tl.float16), acc2)
    elif DOT:
        return acc1 + tl.dot(p, v1, input_precision=PREC), acc2 + tl.dot(p, v2, input_precision=PREC)
    else:
        return acc1 + p[:, None] * v1, acc2 + p[:, None] * v2


@triton.jit
def _update(s, v1, v2, m, l, pm, acc1, acc2, DOT: tl.constexpr, PREC: tl.constexpr, F16: tl.constexpr = False,
            FMA: tl.constexpr = False):
    """One block: ``_softmax`` of its masked scores, then ``_accumulate`` of its values. -> the updated state."""
    p, m, l, pm, acc1, acc2 = _softmax(s, m, l, pm, acc1, acc2, DOT, FMA)
    acc1, acc2 = _accumulate(p, v1, v2, acc1, acc2, DOT, PREC, F16, FMA)
    return m, l, pm, acc1, acc2


@triton.jit
def _init_state(MR: tl.constexpr, N: tl.constexpr, HALF: tl.constexpr, NPM: tl.constexpr, DOT: tl.constexpr):
    """m, l, pm (extra per-token sums, ``NPM`` columns; one row: unused), acc1, acc2."""
    if DOT:
        return (tl.full((MR,), -float("inf"), tl.float32), tl.zeros((MR,), tl.float32),
                tl.zeros((MR, NPM), tl.float32), tl.zeros((MR, HALF), tl.float32), tl.zeros((MR, HALF), tl.float32))
    else:
        return (tl.max(tl.full((N,), -float("inf"), tl.float32), axis=0), tl.zeros((N,), tl.float32),
                tl.zeros((N, NPM), tl.float32), tl.zeros((N, HALF), tl.float32), tl.zeros((N, HALF), tl.float32))


@triton.jit
def _fp16_segment(q1, q2, K, V, base, n, r0, invf, TAB, tab_rows, cj, sj, m, l, pm, acc1, acc2,
                  ROPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                  F16: tl.constexpr = False, FMA: tl.constexpr = False):
    """Attend over ``n`` fp16 tokens at ``K/V + base`` (rows of D). With ``ROPE`` the keys are pre-RoPE, rotated by
    ``cj, sj (BLOCK_N, D/2)`` in a block and the query by the block start: from the host table ``TAB (2, tab_rows,
    D/2)`` at row ``r0 + i / BLOCK_N`` (plus the offset that ``q1, q2`` were already rotated back by), or with
    ``FMA`` from the angles ``(r0 + i) * invf`` (``r0`` the position of token 0, ``invf (1, D/2)``)."""
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    for t0 in range(0, n, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < n
        off = base + t.to(tl.int64)[:, None] * D + ch[None, :]
        k1 = tl.load(K + off, mask=valid[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(K + off + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
        v1 = tl.load(V + off, mask=valid[:, None], other=0.0).to(tl.float32)
        v2 = tl.load(V + off + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
        if ROPE:
            if FMA:
                qr1, qr2 = _rot_pos(q1, q2, invf, r0 + t0)
            else:
                c0, s0 = _table_row(TAB, tab_rows, r0 + t0 // BLOCK_N, HALF)
                qr1, qr2 = _rot_t(q1, q2, c0, s0)
            s = _scores(qr1, qr2, k1 * cj - k2 * sj, k2 * cj + k1 * sj, DOT, PREC, F16, FMA)
        else:  # q made loop-variant (+ 0 * t0): works around a Triton 3.6 layout-pass bug (GQA, two loops)
            s = _scores(q1 + 0.0 * t0, q2 + 0.0 * t0, k1, k2, DOT, PREC, F16, FMA)
        m, l, pm, acc1, acc2 = _update(_mask(s, valid, DOT), v1, v2, m, l, pm, acc1, acc2, DOT, PREC, F16, FMA)
    return m, l, pm, acc1, acc2


@triton.jit
def _fp16_segments(q1, q2, SK, SV, RK, RV, sink_base, res_base, last, n_sink, npk, nrs, invf, TAB, tab_rows, cj, sj,
                   m, l, pm, acc1, acc2, ROPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr, F16: tl.constexpr = False, FMA: tl.constexpr = False):
    """The last split's work (``last``; the other splits attend over nothing): the ``n_sink`` fp16 sink tokens at
    ``SK/SV + sink_base`` (positions from 0), then the ``nrs`` residual tokens at ``RK/RV + res_base`` (positions
    from ``n_sink + npk``, after the ``npk`` packed tokens). ``ROPE``, ``invf``, the table and ``cj, sj``: as
    ``_fp16_segment`` (without ``ROPE`` placeholders; without ``FMA`` the residual's query is rotated back by its
    origin's offset in a block, so that it reads whole table rows)."""
    n_s = tl.where(last, n_sink, 0)
    n_r = tl.where(last, nrs, 0)
    m, l, pm, acc1, acc2 = _fp16_segment(q1, q2, SK, SV, sink_base, n_s, 0, invf, TAB, tab_rows, cj, sj,
                                         m, l, pm, acc1, acc2, ROPE, D, BLOCK_N, DOT, PREC, F16, FMA)
    p_res = n_sink + npk
    if ROPE and not FMA:  # residual token i at p_res + i = (p_res // N + i // N) * N + p_res % N + i % N
        qd1, qd2 = _rot_pos(q1, q2, invf, (p_res % BLOCK_N).to(tl.float32))
        r0 = p_res // BLOCK_N
    else:
        qd1, qd2 = q1, q2
        r0 = p_res
    return _fp16_segment(qd1, qd2, RK, RV, res_base, n_r, r0, invf, TAB, tab_rows, cj, sj,
                         m, l, pm, acc1, acc2, ROPE, D, BLOCK_N, DOT, PREC, F16, FMA)


@triton.jit
def _mask(s, valid, DOT: tl.constexpr):
    if DOT:
        return tl.where(valid[None, :], s, -float("inf"))
    else:
        return tl.where(valid, s, -float("inf"))


@triton.jit
def _store_partial(MP, LP, AP, prow0, NSP, m, l, o1, o2, QPP: tl.constexpr, MR: tl.constexpr,
                   D: tl.constexpr, DOT: tl.constexpr):
    """Partials of query head rows ``prow0 + r * NSP``: ``o (MR, D/2)`` halves, or ``(D/2,)`` and a per-token
    ``l (N,)`` for one row."""
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    if DOT:
        g = tl.arange(0, MR)
        prow = prow0 + g.to(tl.int64) * NSP
        tl.store(MP + prow, m, mask=g < QPP)
        tl.store(LP + prow, l, mask=g < QPP)
        tl.store(AP + prow[:, None] * D + ch[None, :], o1, mask=(g < QPP)[:, None])
        tl.store(AP + prow[:, None] * D + HALF + ch[None, :], o2, mask=(g < QPP)[:, None])
    else:
        tl.store(MP + prow0, m)
        tl.store(LP + prow0, tl.sum(l, axis=0))
        tl.store(AP + prow0 * D + ch, o1)
        tl.store(AP + prow0 * D + HALF + ch, o2)


@triton.jit
def _score_rows(qrow0, n_packed, t, valid, QPP: tl.constexpr, MR: tl.constexpr, DOT: tl.constexpr):
    """Offsets and mask of the block's scores in a ``(B, Hq, n_packed)`` buffer: ``(N,)``, or ``(MR, N)``."""
    if DOT:
        g = tl.arange(0, MR)
        return (qrow0 + g)[:, None] * n_packed + t[None, :], (g < QPP)[:, None] & valid[None, :]
    else:
        return qrow0 * n_packed + t, valid


@triton.jit
def _counts(LENS, n_packed, n_res, tokens_per_split, NSP, BLOCK_N: tl.constexpr, DYN: tl.constexpr):
    """-> packed tokens, residual tokens, packed tokens per split. ``DYN``: the counts are read from ``LENS``
    (int64 ``[n_packed, n_res, ...]`` on the device) and the packed tokens spread evenly, in whole blocks, over
    the ``NSP - 1`` packed splits (the last split does the fp16 segments); else the arguments."""
    if DYN:
        npk = tl.load(LENS).to(tl.int32)
        nrs = tl.load(LENS + 1).to(tl.int32)
        per = split_tokens(npk, NSP, BLOCK_N)
    else:
        npk = n_packed
        nrs = n_res
        per = tokens_per_split
    return npk, nrs, per


@triton.jit
def _split_range(LENS, n_packed, n_res, tokens_per_split, NSP, sp, BLOCK_N: tl.constexpr, DYN: tl.constexpr):
    """-> packed tokens, residual tokens, and split ``sp``'s packed range ``[start, end)`` (``_counts``)."""
    npk, nrs, per = _counts(LENS, n_packed, n_res, tokens_per_split, NSP, BLOCK_N, DYN)
    start = sp * per
    return npk, nrs, start, tl.minimum(start + per, npk)


@triton.jit
def split_tokens(npk, NSP, BLOCK_N: tl.constexpr):
    """Packed tokens per split when the kernel plans the split itself (``DYN``)."""
    return tl.cdiv(tl.cdiv(npk, BLOCK_N), NSP - 1) * BLOCK_N


@triton.jit
def _program_ids(H, NSP, G: tl.constexpr, QPP: tl.constexpr, SEG_ONLY: tl.constexpr = False):
    """-> b, h, first query head, the split index, and the row of its first partial. ``SEG_ONLY``: launched with one
    split, the program is the last one (the fp16 segments: its packed range is empty, the ``NSP - 1`` packed splits
    of a Gluon program, ``decode_mma``, cover every packed token)."""
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    if SEG_ONLY:
        sp += NSP - 1
    GS: tl.constexpr = G // QPP
    bh = pid // GS
    b = bh // H
    h = bh % H
    hq0 = h * G + (pid % GS) * QPP
    prow0 = (b.to(tl.int64) * H * G + hq0) * NSP + sp
    return b, h, hq0, sp, prow0


# ----------------------------------------------------------------------------------------------- kvquant
@triton.jit
def _lut(C, codes, ASM: tl.constexpr):
    """Codebook lookup ``C[codes]`` (a 2^b-entry float32 table, L1 resident). On the GPU an inline-asm load:
    an elementwise op, so the tile keeps the codes' row-major layout. A ``tl.load`` gather has no known
    contiguity and makes Triton pick a token-major layout for it, which then spreads to the whole block
    (cross-warp score reductions, shared-memory layout conversions, register spills: measured 1.9x slower)."""
    if ASM:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [C + codes], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.load(C + codes)


@triton.jit
def _kvq_x(P, C, row, valid, BITS: tl.constexpr, D: tl.constexpr, N: tl.constexpr, ASM: tl.constexpr,
           LOOKUP: tl.constexpr = True, PLAIN: tl.constexpr = False):
    """Codebook values ``x (N, D/2)`` x 2 of ``N`` packed key rows."""
    NB: tl.constexpr = D * BITS // 8
    if LOOKUP:
        x1 = _lut(C, _codes(P + row * NB, valid, 0, BITS, D, N, PLAIN), ASM)
        x2 = _lut(C, _codes(P + row * NB, valid, 1, BITS, D, N, PLAIN), ASM)
    else:  # ablation (timing only): codes as values
        x1 = _codes(P + row * NB, valid, 0, BITS, D, N, PLAIN).to(tl.float32)
        x2 = _codes(P + row * NB, valid, 1, BITS, D, N, PLAIN).to(tl.float32)
    return x1, x2


@triton.jit
def _kvq_values(VP, VMIN, VSC, CV, row, valid, BITS_V: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
                DENSE: tl.constexpr, ASM: tl.constexpr, PLAIN: tl.constexpr = False):
    """Values of ``N`` packed rows: ``v = mn + hs * x`` with ``mn`` = min + range/2, ``hs`` = range/2 per token.
    ``DENSE``: returns ``v`` halves; else the codebook values ``x``."""
    NBV: tl.constexpr = D * BITS_V // 8
    hs = 0.5 * tl.load(VSC + row, mask=valid, other=0.0).to(tl.float32)
    mn = tl.load(VMIN + row, mask=valid, other=0.0).to(tl.float32) + hs
    v1 = _lut(CV, _codes(VP + row * NBV, valid, 0, BITS_V, D, N, PLAIN), ASM)
    v2 = _lut(CV, _codes(VP + row * NBV, valid, 1, BITS_V, D, N, PLAIN), ASM)
    if DENSE:
        v1 = mn[:, None] + hs[:, None] * v1
        v2 = mn[:, None] + hs[:, None] * v2
    return v1, v2, mn, hs


@triton.jit
def _kvquant_split_kernel(
    Q, sqb, sqh,
    KP, KA, KSC, CK,
    VP, VMIN, VSC, CV,
    SK, SV, RK, RV, ssb, ssh, srb, srh,
    INVF, TAB, tab_rows, MP, LP, AP,
    H, Tmax, n_packed, n_sink, n_res, tokens_per_split, NSP, qk_scale,
    DS, SS, SST, LENS,
    G: tl.constexpr, QPP: tl.constexpr, MR: tl.constexpr, D: tl.constexpr, BITS_K: tl.constexpr,
    BITS_V: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, ASM: tl.constexpr, ABLATE: tl.constexpr = 0, PLAIN: tl.constexpr = False,
    SPK: tl.constexpr = False, SPV: tl.constexpr = False, DYN: tl.constexpr = False, F16: tl.constexpr = False,
    SEG_ONLY: tl.constexpr = False,
):
    """KVQuant's per-row sparse outliers are corrections (``decode_outliers``): with ``SPK`` the scores add
    ``DS (B, Hq, SST)``, with ``SPV`` they are stored to ``SS`` (same shape) for the value-outlier kernel. ``DYN``:
    the packed and residual counts come from ``LENS`` on the device (as the kivi kernel; a graph-captured launch).
    ``SEG_ONLY``: launched with one split, it is the last one (the fp16 segments; ``decode_mma_kvquant`` does the
    packed splits)."""
    HALF: tl.constexpr = D // 2
    b, h, hq0, sp, prow0 = _program_ids(H, NSP, G, QPP, SEG_ONLY)
    ch = tl.arange(0, HALF)
    q1, q2 = _load_query(Q, sqb, sqh, b, hq0, qk_scale, QPP, MR, D)
    invf, cj, sj = _rope_offsets(INVF, BLOCK_N, HALF)
    # per-channel affine map folded into R(j): kr1 = TA1 + TB1 x1 - TC1 x2, kr2 = TA2 + TB2 x2 + TC2 x1
    a1 = tl.load(KA + h * D + ch)[None, :]
    a2 = tl.load(KA + h * D + HALF + ch)[None, :]
    s1 = tl.load(KSC + h * D + ch)[None, :]
    s2 = tl.load(KSC + h * D + HALF + ch)[None, :]
    ta1 = a1 * cj - a2 * sj
    ta2 = a2 * cj + a1 * sj
    tb1 = s1 * cj
    tc1 = s2 * sj
    tb2 = s2 * cj
    tc2 = s1 * sj
    # packed token i sits at n_sink + i: rotate the query back by n_sink once, by i0 (table) per block
    qs1, qs2 = _rot_pos(q1, q2, invf, n_sink * 1.0)  # not n_sink.to(): an int argument equal to 1 is a constexpr
    m, l, pm, acc1, acc2 = _init_state(MR, BLOCK_N, HALF, 1, DOT)
    qrow0 = b.to(tl.int64) * H * G + hq0  # first query row of the program in DS / SS
    FOLD: tl.constexpr = not DOT  # one row: accumulate (p hs) x per element and p mn per token
    npk, nrs, start, end = _split_range(LENS, n_packed, n_res, tokens_per_split, NSP, sp, BLOCK_N, DYN)
    bh = (b * H + h).to(tl.int64)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        row = bh * Tmax + t
        x1, x2 = _kvq_x(KP, CK, row, valid, BITS_K, D, BLOCK_N, ASM, ABLATE != 2, PLAIN)
        if ABLATE == 1:  # ablation (timing only): no RoPE
            s = _mask(_scores(qs1, qs2, a1 + s1 * x1, a2 + s2 * x2, DOT, PREC, F16), valid, DOT)
        else:
            c0, s0 = _table_row(TAB, tab_rows, t0 // BLOCK_N, HALF)
            qr1, qr2 = _rot_t(qs1, qs2, c0, s0)
            s = _mask(_scores(qr1, qr2, ta1 + tb1 * x1 - tc1 * x2, ta2 + tb2 * x2 + tc2 * x1, DOT, PREC, F16), valid,
                      DOT)
        if SPK or SPV:
            srow, smask = _score_rows(qrow0, SST, t, valid, QPP, MR, DOT)
            if SPK:
                s += tl.load(DS + srow, mask=smask, other=0.0)
            if SPV:
                tl.store(SS + srow, s, mask=smask)
        p, m, l, pm, acc1, acc2 = _softmax(s, m, l, pm, acc1, acc2, DOT)
        v1, v2, mn, hs = _kvq_values(VP, VMIN, VSC, CV, row, valid, BITS_V, D, BLOCK_N, not FOLD, ASM, PLAIN)
        if FOLD:
            pm += (p * mn)[:, None]
            acc1, acc2 = _accumulate(p * hs, v1, v2, acc1, acc2, DOT, PREC, F16)
        else:
            acc1, acc2 = _accumulate(p, v1, v2, acc1, acc2, DOT, PREC, F16)
    m, l, pm, acc1, acc2 = _fp16_segments(q1, q2, SK, SV, RK, RV, b.to(tl.int64) * ssb + h * ssh,
                                          b.to(tl.int64) * srb + h * srh, sp == NSP - 1, n_sink, npk, nrs, invf, TAB,
                                          tab_rows, cj, sj, m, l, pm, acc1, acc2, True, D, BLOCK_N, DOT, PREC, F16)
    if DOT:
        _store_partial(MP, LP, AP, prow0, NSP, m, l, acc1, acc2, QPP, MR, D, DOT)
    else:
        extra = tl.sum(tl.sum(pm, axis=1), axis=0)
        _store_partial(MP, LP, AP, prow0, NSP, m, l, tl.sum(acc1, axis=0) + extra, tl.sum(acc2, axis=0) + extra,
                       QPP, MR, D, DOT)


# ----------------------------------------------------------------------------------------------- kivi
@triton.jit
def _group_tile(P, row, valid, p, HH: tl.constexpr, HALF: tl.constexpr, VG: tl.constexpr, NVG: tl.constexpr):
    """``p[n] * P[row n, group of channel]`` over the channels of half ``HH`` -> ``(N, D/2)`` (per-token loads of
    each group's value, broadcast: the tile stays in the codes' layout)."""
    G_LO: tl.constexpr = HH * HALF // VG
    G_HI: tl.constexpr = ((HH + 1) * HALF - 1) // VG + 1
    gsel = (HH * HALF + tl.arange(0, HALF)) // VG
    out = (p * tl.load(P + row * NVG + G_LO, mask=valid, other=0.0).to(tl.float32))[:, None] + tl.zeros(
        (1, HALF), tl.float32)
    for g in tl.static_range(G_LO + 1, G_HI):
        pg = p * tl.load(P + row * NVG + g, mask=valid, other=0.0).to(tl.float32)
        out = tl.where(gsel[None, :] == g, pg[:, None], out)
    return out


@triton.jit
def _kivi_finish(Q, q1, q2, SK, SV, RK, RV, sink_base, res_base, last, n_sink, npk, nrs, m, l, pm, acc1, acc2,
                 MP, LP, AP, prow0, NSP, QPP: tl.constexpr, MR: tl.constexpr, D: tl.constexpr, VG: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, F16: tl.constexpr):
    """The kivi programs' end: the fp16 segments (last split), then the partials; one row adds its per-group sums
    ``pm (N, D/VG)`` to every channel of the group."""
    HALF: tl.constexpr = D // 2
    NVG: tl.constexpr = D // VG
    m, l, pm, acc1, acc2 = _fp16_segments(q1, q2, SK, SV, RK, RV, sink_base, res_base, last, n_sink, npk, nrs, q1, Q,
                                          0, q1, q1, m, l, pm, acc1, acc2, False, D, BLOCK_N, DOT, PREC, F16)
    if DOT:
        _store_partial(MP, LP, AP, prow0, NSP, m, l, acc1, acc2, QPP, MR, D, DOT)
    else:
        ch = tl.arange(0, HALF)
        cg = tl.arange(0, NVG)
        pz = tl.sum(pm, axis=0)  # (NVG,) -> channels
        e1 = tl.sum(tl.where(cg[:, None] == (ch // VG)[None, :], pz[:, None], 0.0), axis=0)
        e2 = tl.sum(tl.where(cg[:, None] == ((ch + HALF) // VG)[None, :], pz[:, None], 0.0), axis=0)
        _store_partial(MP, LP, AP, prow0, NSP, m, l, tl.sum(acc1, axis=0) + e1, tl.sum(acc2, axis=0) + e2,
                       QPP, MR, D, DOT)


@triton.jit
def _word_values(w, sc, zr, BITS: tl.constexpr, F16: tl.constexpr, N: tl.constexpr):
    """Values ``code * s + z`` ``(N, W * 32/BITS)`` of words ``w (N, W)`` with a scale and zero per word
    ``(N, W)``: in fp16 (``F16``) or float32."""
    if F16:
        return (_unpack_words(w, BITS, 0, N) - MAGIC_F16) * _spread(sc, BITS, N) + _spread(zr, BITS, N)
    else:
        return (_unpack_words(w, BITS, 1, N) - MAGIC_F32) * _spread(sc.to(tl.float32), BITS, N) + _spread(
            zr.to(tl.float32), BITS, N)


@triton.jit
def _kivi_split_kernel(
    Q, sqb, sqh,
    KP, KS, KZ, VP, VS, VZ,
    SK, SV, RK, RV, ssb, ssh, srb, srh,
    MP, LP, AP,
    H, Tmax, NGmax, n_packed, n_sink, n_res, tokens_per_split, NSP, qk_scale, LENS,
    G: tl.constexpr, QPP: tl.constexpr, MR: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, KG: tl.constexpr,
    VG: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, PLAIN: tl.constexpr = False,
    DYN: tl.constexpr = False, F16: tl.constexpr = False, WORDS: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    SEG_ONLY: tl.constexpr = False,
):
    """As the kvquant kernel; ``BLOCK_N`` divides the key group ``KG``, so a block has one key scale/zero row:
    scores are ``q . z + (q * s) . codes``. ``DYN``: the packed and residual counts are read from ``LENS``
    (int32 ``[n_packed, n_res]`` on the device) and the packed tokens split evenly over the ``NSP - 1`` splits
    here, so a launch captured in a CUDA graph stays right as the cache grows (``n_packed``, ``n_res`` and
    ``tokens_per_split`` are then ignored). ``WORDS``: the codes are read as 32-bit words and made floats by bit
    tricks (``pack._unpack_words``), the value scales and zeros applied per word (``_kivi_words_loop``).
    ``SEG_ONLY``: launched with one split, it is the last one (the fp16 segments; ``decode_mma_kivi`` does the
    packed splits)."""
    HALF: tl.constexpr = D // 2
    NB: tl.constexpr = D * BITS // 8
    NVG: tl.constexpr = D // VG
    b, h, hq0, sp, prow0 = _program_ids(H, NSP, G, QPP, SEG_ONLY)
    ch = tl.arange(0, HALF)
    cg = tl.arange(0, NVG)
    q1, q2 = _load_query(Q, sqb, sqh, b, hq0, qk_scale, QPP, MR, D)
    m, l, pm, acc1, acc2 = _init_state(MR, BLOCK_N, HALF, NVG, DOT)
    npk, nrs, start, end = _split_range(LENS, n_packed, n_res, tokens_per_split, NSP, sp, BLOCK_N, DYN)
    bh = (b * H + h).to(tl.int64)
    if WORDS:
        m, l, pm, acc1, acc2 = _kivi_words_loop(q1, q2, KP, KS, KZ, VP, VS, VZ, bh, Tmax, NGmax, start, end,
                                                m, l, pm, acc1, acc2, D, BITS, KG, VG, BLOCK_N, DOT, PREC, F16,
                                                PREFETCH)
    else:  # byte-wise codes
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            valid = t < end
            row = bh * Tmax + t
            goff = (bh * NGmax + t0 // KG) * D + ch
            z1 = tl.load(KZ + goff).to(tl.float32)[None, :]
            z2 = tl.load(KZ + goff + HALF).to(tl.float32)[None, :]
            c1 = _codes(KP + row * NB, valid, 0, BITS, D, BLOCK_N, PLAIN).to(tl.float32)
            c2 = _codes(KP + row * NB, valid, 1, BITS, D, BLOCK_N, PLAIN).to(tl.float32)
            qk1 = q1 * tl.load(KS + goff).to(tl.float32)[None, :]
            qk2 = q2 * tl.load(KS + goff + HALF).to(tl.float32)[None, :]
            if DOT:
                qz = tl.sum(q1 * z1 + q2 * z2, axis=1)[:, None]
            else:
                qz = tl.sum(tl.sum(q1 * z1 + q2 * z2, axis=1), axis=0)
            s = _mask(_scores(qk1, qk2, c1, c2, DOT, PREC, F16) + qz, valid, DOT)
            p, m, l, pm, acc1, acc2 = _softmax(s, m, l, pm, acc1, acc2, DOT)
            # values: per-token scale / zero of each group of VG channels
            d1 = _codes(VP + row * NB, valid, 0, BITS, D, BLOCK_N, PLAIN).to(tl.float32)
            d2 = _codes(VP + row * NB, valid, 1, BITS, D, BLOCK_N, PLAIN).to(tl.float32)
            if DOT:
                one = tl.full((BLOCK_N,), 1.0, tl.float32)
                v1 = _group_tile(VZ, row, valid, one, 0, HALF, VG, NVG) + _group_tile(VS, row, valid, one, 0, HALF, VG,
                                                                                      NVG) * d1
                v2 = _group_tile(VZ, row, valid, one, 1, HALF, VG, NVG) + _group_tile(VS, row, valid, one, 1, HALF, VG,
                                                                                      NVG) * d2
                acc1, acc2 = _accumulate(p, v1, v2, acc1, acc2, DOT, PREC, F16)
            else:  # accumulate (p s) codes per element and p z per token and group
                vz = tl.load(VZ + row[:, None] * NVG + cg[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
                pm += p[:, None] * vz
                acc1 += _group_tile(VS, row, valid, p, 0, HALF, VG, NVG) * d1
                acc2 += _group_tile(VS, row, valid, p, 1, HALF, VG, NVG) * d2
    _kivi_finish(Q, q1, q2, SK, SV, RK, RV, b.to(tl.int64) * ssb + h * ssh, b.to(tl.int64) * srb + h * srh,
                 sp == NSP - 1, n_sink, npk, nrs, m, l, pm, acc1, acc2, MP, LP, AP, prow0, NSP, QPP, MR, D, VG, BLOCK_N,
                 DOT, PREC, F16)


@triton.jit
def _kivi_word_loads(KP, KS, KZ, VP, VS, VZ, bh, Tmax, NGmax, t0, end, D: tl.constexpr, BITS: tl.constexpr,
                     KG: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr):
    """Everything one block of ``_kivi_words_loop`` reads, raw: key and value words ``(N, W)`` per half, the
    key scale / zero ``(D/2,)`` per half, the value scale / zero per word ``(N, W)`` and per group ``(N, D/VG)``."""
    HALF: tl.constexpr = D // 2
    NVG: tl.constexpr = D // VG
    CPW: tl.constexpr = 32 // BITS
    NWH: tl.constexpr = D * BITS // 64
    t = t0 + tl.arange(0, BLOCK_N)
    valid = t < end
    row = bh * Tmax + t
    ch = tl.arange(0, HALF)
    goff = (bh * NGmax + tl.maximum(tl.minimum(t0, end - 1), 0) // KG) * D + ch  # (clamped: no unmasked stray read)
    wrow1 = row[:, None] * NVG + (tl.arange(0, NWH) * CPW // VG)[None, :]
    wrow2 = row[:, None] * NVG + ((HALF + tl.arange(0, NWH) * CPW) // VG)[None, :]
    grow = row[:, None] * NVG + tl.arange(0, NVG)[None, :]
    vm = valid[:, None]
    return (_words(KP, row, valid, 0, BITS, D), _words(KP, row, valid, 1, BITS, D), tl.load(KS + goff),
            tl.load(KS + goff + HALF), tl.load(KZ + goff), tl.load(KZ + goff + HALF),
            _words(VP, row, valid, 0, BITS, D), _words(VP, row, valid, 1, BITS, D),
            tl.load(VS + wrow1, mask=vm, other=0.0), tl.load(VS + wrow2, mask=vm, other=0.0),
            tl.load(VZ + wrow1, mask=vm, other=0.0), tl.load(VZ + wrow2, mask=vm, other=0.0),
            tl.load(VS + grow, mask=vm, other=0.0), tl.load(VZ + grow, mask=vm, other=0.0))


@triton.jit
def _kivi_words_loop(q1, q2, KP, KS, KZ, VP, VS, VZ, bh, Tmax, NGmax, start, end, m, l, pm, acc1, acc2,
                     D: tl.constexpr, BITS: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT: tl.constexpr, PREC: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr):
    """``_kivi_split_kernel``'s packed blocks ``[start, end)`` with codes read as words (1, 2 or 4 bits, halves of
    whole words). No conversion instruction per element:

    * fp16 dots (``DOT`` and ``F16``): key tiles are ``1024 + code`` in fp16, straight into the dot, the offset
      corrected per row (``- 1024 sum(q s)``, exact products, float32 sums); value tiles ``(e - 1024) s + z`` in fp16
      with each word's scale and zero (a word lies in one value group);
    * one row (``DOT`` False): float32 ``x = 1 + code/16``; scores ``(16 q s) . x`` less ``sum(16 q s)``, values
      accumulated as ``(16 p s) x`` per element (``p s`` per word) and ``p (z - 16 s)`` per value group;
    * float32 dots: ``2^23 + code`` minus ``2^23`` (exact).

    ``PREFETCH``: the next block's loads (``_kivi_word_loads``) are issued before this block's math, a register
    double buffer (H200, 128K, MHA: 586 -> 507 us; the GQA programs, bound by staging dot operands through shared
    memory, measured 191 -> 212 us with it and leave it off). -> the updated softmax state."""
    H16: tl.constexpr = DOT and F16
    (kw1, kw2, ks1, ks2, kz1, kz2, vw1, vw2, vs1, vs2, vz1, vz2, vsg, vzg) = _kivi_word_loads(
        KP, KS, KZ, VP, VS, VZ, bh, Tmax, NGmax, start, end, D, BITS, KG, VG, BLOCK_N)
    MODE: tl.constexpr = 0 if H16 else (1 if DOT else 2)
    for t0 in range(start, end, BLOCK_N):
        valid = t0 + tl.arange(0, BLOCK_N) < end
        if PREFETCH:  # the next block's loads in flight while this one computes
            (nkw1, nkw2, nks1, nks2, nkz1, nkz2, nvw1, nvw2, nvs1, nvs2, nvz1, nvz2, nvsg, nvzg) = _kivi_word_loads(
                KP, KS, KZ, VP, VS, VZ, bh, Tmax, NGmax, t0 + BLOCK_N, end, D, BITS, KG, VG, BLOCK_N)
        else:
            (kw1, kw2, ks1, ks2, kz1, kz2, vw1, vw2, vs1, vs2, vz1, vz2, vsg, vzg) = _kivi_word_loads(
                KP, KS, KZ, VP, VS, VZ, bh, Tmax, NGmax, t0, end, D, BITS, KG, VG, BLOCK_N)
        z1 = kz1.to(tl.float32)[None, :]
        z2 = kz2.to(tl.float32)[None, :]
        qk1 = q1 * ks1.to(tl.float32)[None, :]
        qk2 = q2 * ks2.to(tl.float32)[None, :]
        e1 = _unpack_words(kw1, BITS, MODE, BLOCK_N)
        e2 = _unpack_words(kw2, BITS, MODE, BLOCK_N)
        if H16:
            qk1 = qk1.to(tl.float16)
            qk2 = qk2.to(tl.float16)
            qz = tl.sum(q1 * z1 + q2 * z2 - MAGIC_F16 * (qk1.to(tl.float32) + qk2.to(tl.float32)), axis=1)[:, None]
            s = tl.dot(qk2, tl.trans(e2), tl.dot(qk1, tl.trans(e1))) + qz
        elif DOT:
            qz = tl.sum(q1 * z1 + q2 * z2, axis=1)[:, None]
            s = _scores(qk1, qk2, e1 - MAGIC_F32, e2 - MAGIC_F32, DOT, PREC, F16) + qz
        else:
            qk1 = qk1 * UNIT_SCALE
            qk2 = qk2 * UNIT_SCALE
            qz = tl.sum(tl.sum(q1 * z1 + q2 * z2 - qk1 - qk2, axis=1), axis=0)
            s = _scores(qk1, qk2, e1, e2, DOT, PREC, F16) + qz
        p, m, l, pm, acc1, acc2 = _softmax(_mask(s, valid, DOT), m, l, pm, acc1, acc2, DOT)
        if DOT:
            acc1, acc2 = _accumulate(p, _word_values(vw1, vs1, vz1, BITS, H16, BLOCK_N),
                                     _word_values(vw2, vs2, vz2, BITS, H16, BLOCK_N), acc1, acc2, DOT, PREC, F16)
        else:  # (16 p s) x per element, p (z - 16 s) per token and group
            pm += p[:, None] * (vzg.to(tl.float32) - UNIT_SCALE * vsg.to(tl.float32))
            pu = p[:, None] * UNIT_SCALE
            acc1 += _spread(pu * vs1.to(tl.float32), BITS, BLOCK_N) * _unpack_words(vw1, BITS, 2, BLOCK_N)
            acc2 += _spread(pu * vs2.to(tl.float32), BITS, BLOCK_N) * _unpack_words(vw2, BITS, 2, BLOCK_N)
        if PREFETCH:
            kw1, kw2, ks1, ks2, kz1, kz2 = nkw1, nkw2, nks1, nks2, nkz1, nkz2
            vw1, vw2, vs1, vs2, vz1, vz2, vsg, vzg = nvw1, nvw2, nvs1, nvs2, nvz1, nvz2, nvsg, nvzg
    return m, l, pm, acc1, acc2
