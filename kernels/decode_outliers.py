"""KVQuant's sparse outliers around the kvquant split programs: per-row CSR entries (``kvq_kernels.sparse``)
handled as corrections by two small kernels, so the split programs' token loop only reads and writes one float
per token and query head (dense-and-sparse, as KVQuant's own kernels split the work).

The dense codes at an outlier's position still decode to a (clipped) value ``x_d``; the outlier's value is
``x_o``. With ``delta = x_o - x_d``:

* before the split programs, ``_key_outlier_kernel`` adds ``delta * (R(P)^T q)[c]`` (scaled, log2 domain) to a
  zeroed score buffer ``DS (B, Hq, n_packed)`` (keys are pre-RoPE: the query is rotated to the key's position
  ``P``; ``cos / sin`` of the block start from the host table, the rest in-kernel); the split programs add
  ``DS`` to their scores and, when there are value outliers, store the corrected scores in ``S``;
* after them, ``_value_outlier_kernel`` adds ``exp2(S - m_split) * delta`` at channel ``c`` to the partial
  output of the split that holds the token (``m_split``: that split's running max, which its partial output is
  relative to); the reduce kernel then normalizes it with everything else.

Grid ``(B*H, sparse blocks)``: one program per row and block of ``SB`` tokens, ``MAXO`` entries at a time. The
atomics are relaxed: their sums are read by later kernels only, and the default (acquire-release) fenced each one
(ncu, H200, 128K: a third of the warps' cycles stalled on memory barriers, session 13).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_split import split_tokens
from .pack import _code_bytes


@triton.jit
def _code_at(P, row, c, valid, BITS: tl.constexpr, D: tl.constexpr):
    """The packed code of channel ``c`` in ``row`` (vectors; layout: ``kvq_kernels.reference``)."""
    return _code_bytes(P + row * (D * BITS // 8), c, valid, BITS, D)


@triton.jit
def _program_block(SP, npt, H):
    """This program's row ``bh`` (its batch ``b`` and KV head ``h``), sparse block ``k`` and the block's entries
    ``[start, stop)``."""
    bh = tl.program_id(1).to(tl.int64)  # grid (sparse blocks, B*H): axis 0 holds 2**31 - 1 blocks, axis 1 65535
    k = tl.program_id(0)
    return bh, bh // H, bh % H, k, tl.load(SP + bh * npt + k), tl.load(SP + bh * npt + k + 1)


@triton.jit
def _entries(SV, SI, bh, cap, k, s0, stop, n_packed, SB: tl.constexpr, D: tl.constexpr, MAXO: tl.constexpr):
    """Entries ``s0 + [0, MAXO)`` (below ``stop``) of sparse block ``k`` of row ``bh``: value, token, channel,
    usable."""
    e = s0 + tl.arange(0, MAXO)
    ok = e < stop
    ix = tl.load(SI + bh * cap + e, mask=ok, other=0).to(tl.int32)
    ov = tl.load(SV + bh * cap + e, mask=ok, other=0.0).to(tl.float32)
    t = k * SB + ix // D
    ok = ok & (t < n_packed)
    return ov, tl.where(ok, t, 0), ix % D, ok


@triton.jit
def _key_outlier_kernel(Q, sqb, sqh, SV, SI, SP, cap, npt, KP, KA, KSC, CK, INVF, TAB, tab_rows, DS,
                        H, Tmax, n_packed, n_sink, qk_scale, SST, LENS,
                        G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, SB: tl.constexpr, TB: tl.constexpr,
                        MAXO: tl.constexpr, DYN: tl.constexpr = False):
    """``DS[b, h*G + g, t] += delta * (R(n_sink + t)^T q_g)[c] * qk_scale`` for every key outlier (atomics);
    ``DS`` rows of ``SST``. ``DYN``: ``n_packed`` is read from ``LENS`` (a graph-captured launch)."""
    HALF: tl.constexpr = D // 2
    if DYN:
        npk = tl.load(LENS).to(tl.int32)
    else:
        npk = n_packed
    bh, b, h, k, start, stop = _program_block(SP, npt, H)
    for s0 in range(start, stop, MAXO):
        ov, t, c, ok = _entries(SV, SI, bh, cap, k, s0, stop, npk, SB, D, MAXO)
        dense = tl.load(KA + h * D + c) + tl.load(KSC + h * D + c) * tl.load(
            CK + _code_at(KP, bh * Tmax + t, c, ok, BITS, D))
        delta = tl.where(ok, ov - dense, 0.0) * qk_scale
        cp = c % HALF
        pos = n_sink + t
        r = pos // TB
        ang = (pos % TB).to(tl.float32) * tl.load(INVF + cp)  # small: the table holds r * TB * inv_freq
        cb = tl.load(TAB + r * HALF + cp, mask=ok, other=1.0)
        sb = tl.load(TAB + (tab_rows + r) * HALF + cp, mask=ok, other=0.0)
        ca, sa = tl.cos(ang), tl.sin(ang)
        cs = cb * ca - sb * sa
        sn = sb * ca + cb * sa
        partner = tl.where(c < HALF, c + HALF, c - HALF)
        sign = tl.where(c < HALF, 1.0, -1.0)
        for g in range(G):
            qrow = Q + b * sqb + (h * G + g) * sqh
            qc = tl.load(qrow + c, mask=ok, other=0.0).to(tl.float32)
            qp = tl.load(qrow + partner, mask=ok, other=0.0).to(tl.float32)
            tl.atomic_add(DS + ((b * H + h) * G + g) * SST + t, (qc * cs + sign * qp * sn) * delta, mask=ok,
                          sem="relaxed")


@triton.jit
def _value_outlier_kernel(SV, SI, SP, cap, npt, VP, VMIN, VSC, CV, S, MP, AP,
                          H, Tmax, n_packed, tokens_per_split, NSP, SST, LENS,
                          G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, SB: tl.constexpr,
                          MAXO: tl.constexpr, TB: tl.constexpr = 16, DYN: tl.constexpr = False):
    """``AP[b, h*G + g, split, c] += exp2(S[b, h*G + g, t] - MP[.., split]) * delta`` for every value outlier;
    ``S`` rows of ``SST``. ``DYN``: ``n_packed`` from ``LENS`` and the split kernel's own plan (blocks of ``TB``)."""
    if DYN:
        npk = tl.load(LENS).to(tl.int32)
        per = split_tokens(npk, NSP, TB)
    else:
        npk = n_packed
        per = tokens_per_split
    bh, b, h, k, start, stop = _program_block(SP, npt, H)
    for s0 in range(start, stop, MAXO):
        ov, t, c, ok = _entries(SV, SI, bh, cap, k, s0, stop, npk, SB, D, MAXO)
        row = bh * Tmax + t
        hs = 0.5 * tl.load(VSC + row, mask=ok, other=0.0).to(tl.float32)
        mn = tl.load(VMIN + row, mask=ok, other=0.0).to(tl.float32) + hs
        delta = tl.where(ok, ov - (mn + hs * tl.load(CV + _code_at(VP, row, c, ok, BITS, D))), 0.0)
        split = t // per
        for g in range(G):
            hq = (b * H + h) * G + g
            s = tl.load(S + hq * SST + t, mask=ok, other=0.0)
            m = tl.load(MP + hq * NSP + split, mask=ok, other=0.0)
            tl.atomic_add(AP + (hq * NSP + split) * D + c, tl.exp2(s - m) * delta, mask=ok, sem="relaxed")
