"""Sparse outliers in the kvquant split programs: per-row CSR entries (``kvq_kernels.sparse``) as corrections.

The dense codes at an outlier's position still decode to a (clipped) value ``x_d``; the outlier's true value is
``x_o``. A program working on the tokens ``[t0, t0 + BLOCK_N)`` reads the entries of their sparse block, at most
``MAXO`` at a time, and adds

* to the scores: ``(x_o - x_d) * (R(P)^T q)[c]`` (keys are pre-RoPE: the query is rotated to the key's absolute
  position ``P``; ``cos / sin (t0 inv_freq)`` from the host table, the small rest computed in-kernel), and
* to the output: ``p[token] * (x_o - x_d)`` at channel ``c`` (in a separate ``(MR, D/2)`` x 2 accumulator
  that follows the running max).

One query row (MHA): the gathers and scatters are ``(MAXO, N)`` / ``(MAXO, D/2)`` masked sums. Several rows
(GQA): the same through ``tl.dot`` with one-hot matrices. Cost scales with the outliers, not the block.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _code_at(P, row, c, valid, BITS: tl.constexpr, D: tl.constexpr):
    """The packed code of channel ``c`` in ``row`` (vectors; layout: ``kvq_kernels.reference``)."""
    NB: tl.constexpr = D * BITS // 8
    base = P + row * NB
    if BITS == 3:
        lo = tl.load(base + c // 4, mask=valid, other=0).to(tl.int32)
        hi = tl.load(base + D // 4 + c // 8, mask=valid, other=0).to(tl.int32)
        return ((lo >> (2 * (c % 4))) & 3) | (((hi >> (c % 8)) & 1) << 2)
    else:
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(base + c // PER, mask=valid, other=0).to(tl.int32)
        return (byte >> (BITS * (c % PER))) & ((1 << BITS) - 1)


@triton.jit
def _entries(SV, SI, bh, cap, t0, e, stop, end_tok, SB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Entries ``e (MAXO,)`` of row ``bh`` (below ``stop``): value, channel, token offset ``j`` in the block
    (0 where unusable), and whether usable (inside the block and before ``end_tok``)."""
    ok0 = e < stop
    ix = tl.load(SI + bh * cap + e, mask=ok0, other=0).to(tl.int32)
    ov = tl.load(SV + bh * cap + e, mask=ok0, other=0.0).to(tl.float32)
    j = (t0 // SB) * SB + ix // D - t0
    ok = ok0 & (j >= 0) & (j < BLOCK_N) & (t0 + j < end_tok)
    return ov, ix % D, tl.where(ok, j, 0), ok


@triton.jit
def _block_range(SP, bh, npt, t0, SB: tl.constexpr):
    """``[start, stop)`` of the entries of the sparse block holding token ``t0``."""
    k = t0 // SB
    return tl.load(SP + bh * npt + k), tl.load(SP + bh * npt + k + 1)


@triton.jit
def _key_scores(Q, qoff, qk_scale, SV, SI, SP, bh, cap, npt, t0, end_tok, P, prow0, KA, KSC, CK, INVF, TAB,
                tab_rows, pos0, MR: tl.constexpr, QPP: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                BITS: tl.constexpr, SB: tl.constexpr, MAXO: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Score corrections of the block's key outliers: ``(N,)`` for one row, ``(MR, N)`` with ``DOT``.

    ``qoff (MR,)``: offsets of the query rows in ``Q``; ``pos0``: absolute position of the block's first token
    minus ``t0`` (= the sink length; the table row is ``t0 / N``); ``P + prow0``: the block's first packed row."""
    HALF: tl.constexpr = D // 2
    g = tl.arange(0, MR)
    n = tl.arange(0, N)
    if DOT:
        ds = tl.zeros((MR, N), tl.float32)
    else:
        ds = tl.zeros((N,), tl.float32)
    e0, e1 = _block_range(SP, bh, npt, t0, SB)
    c0t = t0 // N  # the host table's row: cos / sin (t0 inv_freq)
    for s0 in range(e0, e1, MAXO):
        e = s0 + tl.arange(0, MAXO)
        ov, c, jj, ok = _entries(SV, SI, bh, cap, t0, e, e1, end_tok, SB, N, D)
        dense = tl.load(KA + c) + tl.load(KSC + c) * tl.load(CK + _code_at(P, prow0 + jj, c, ok, BITS, D))
        delta = tl.where(ok, ov - dense, 0.0)
        cp = c % HALF
        ang = (pos0 + jj).to(tl.float32) * tl.load(INVF + cp)
        cb = tl.load(TAB + c0t * HALF + cp)
        sb = tl.load(TAB + (tab_rows + c0t) * HALF + cp)
        cs = cb * tl.cos(ang) - sb * tl.sin(ang)
        sn = sb * tl.cos(ang) + cb * tl.sin(ang)
        partner = tl.where(c < HALF, c + HALF, c - HALF)
        sign = tl.where(c < HALF, 1.0, -1.0)
        qm = (g < QPP)[:, None] & ok[None, :]
        qc = tl.load(Q + qoff[:, None] + c[None, :], mask=qm, other=0.0).to(tl.float32)
        qp = tl.load(Q + qoff[:, None] + partner[None, :], mask=qm, other=0.0).to(tl.float32)
        w = (qc * cs[None, :] + sign[None, :] * qp * sn[None, :]) * qk_scale * delta[None, :]  # (MR, MAXO)
        hit = ok[:, None] & (jj[:, None] == n[None, :])  # (MAXO, N)
        if DOT:
            ds += tl.dot(w, hit.to(tl.float32), input_precision=PREC)
        else:
            ds += tl.sum(tl.where(hit, tl.sum(w, axis=0)[:, None], 0.0), axis=0)
    return ds


@triton.jit
def _value_fix(p, o1, o2, SV, SI, SP, bh, cap, npt, t0, end_tok, P, prow0, VMIN, VSC, CV, MR: tl.constexpr,
               N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, SB: tl.constexpr, MAXO: tl.constexpr,
               DOT: tl.constexpr, PREC: tl.constexpr):
    """Add ``p[token] * (value outlier - dense value)`` of the block's value outliers to ``o1, o2``: ``(D/2,)``
    each for one row (``p (N,)``), ``(MR, D/2)`` with ``DOT`` (``p (MR, N)``)."""
    HALF: tl.constexpr = D // 2
    n = tl.arange(0, N)
    ch = tl.arange(0, HALF)
    e0, e1 = _block_range(SP, bh, npt, t0, SB)
    for s0 in range(e0, e1, MAXO):
        e = s0 + tl.arange(0, MAXO)
        ov, c, jj, ok = _entries(SV, SI, bh, cap, t0, e, e1, end_tok, SB, N, D)
        row = prow0 + jj
        hs = 0.5 * tl.load(VSC + row, mask=ok, other=0.0).to(tl.float32)
        mn = tl.load(VMIN + row, mask=ok, other=0.0).to(tl.float32) + hs
        dense = mn + hs * tl.load(CV + _code_at(P, row, c, ok, BITS, D))
        delta = tl.where(ok, ov - dense, 0.0)
        hit = ok[:, None] & (jj[:, None] == n[None, :])  # (MAXO, N)
        lo = ok[:, None] & (c[:, None] == ch[None, :])  # (MAXO, HALF): channel in the first half
        hi = ok[:, None] & ((c - HALF)[:, None] == ch[None, :])
        if DOT:
            pv = tl.dot(p, tl.trans(hit.to(tl.float32)), input_precision=PREC) * delta[None, :]  # (MR, MAXO)
            o1 += tl.dot(pv, lo.to(tl.float32), input_precision=PREC)
            o2 += tl.dot(pv, hi.to(tl.float32), input_precision=PREC)
        else:
            pv = tl.sum(tl.where(hit, p[None, :], 0.0), axis=1) * delta  # (MAXO,)
            o1 += tl.sum(tl.where(lo, pv[:, None], 0.0), axis=0)
            o2 += tl.sum(tl.where(hi, pv[:, None], 0.0), axis=0)
    return o1, o2
