"""Fused quantize-and-append of KVQuant tokens into the runtime's stores: one launch per stream and step.

The runtime (``kvq_cli.runtime.storage``) keeps KVQuant exactly as the method encodes it
(``kvq_cli.methods.kvquant``): packed NUQ codes, per-(token, head) fp16 ``scale``/``zero`` for values, and
every outlier in per-row ``SparseRows`` (keys: the entries beyond the calibrated per-channel thresholds, any
number per token and head; values: the ``n`` largest and ``n`` smallest entries of each token over all KV
heads). This kernel does all of it for ``T`` new tokens in one program per sequence, without a host sync:

* keys (``IS_KEY``): ``y = 2 (x - lo) / (hi - lo) - 1`` clamped, outliers ``x < lo or x > hi``;
* values: the per-token top/bottom ``n`` over all heads (ties: lowest ``h * D + d`` first), then per head
  ``zero = fp16_floor(min)``, ``scale = fp16_ceil(max - zero)`` over the inliers (all entries when a head has
  none), ``y = 2 (x - zero) / scale - 1`` clamped;
* both: the nearest centroid (count of codebook midpoints below ``y``), packed as ``reference.pack_codes``;
  outliers appended to their rows in channel order with ``idx = (t % block) * D + d``, and the row pointer of
  the token's block updated (``kvq_kernels.sparse`` for the layout).

The caller reserves room first (``SparseRows.reserve``; the buffers' capacity is never read back here).
Reference: the method's ``encode_keys`` / ``encode_values``, ``reference.pack_codes`` and
``SparseRows.append``; ``tests/test_append.py`` compares every byte.

Public function:
    append_kvquant(x, codes, n, mids, bits, *, lo=None, hi=None, scale=None, zero=None, n_out=0, rows=None)
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .pack import _nearest, _store_codes
from .reference import check_head_dim, next_pow2, packed_bytes
from .sparse import SparseRows

FP16_MAX = tl.constexpr(65504.0)
I64_MIN = tl.constexpr(-(1 << 63))
I64_MAX = tl.constexpr((1 << 63) - 1)


@triton.jit
def _fp16_outward(x, UP: tl.constexpr):
    """``x`` rounded to fp16 towards +inf (``UP``) or -inf: ``quant_ops.fp16_ceil`` / ``fp16_floor`` (in range)."""
    x = tl.minimum(tl.maximum(x, -FP16_MAX), FP16_MAX)
    h = x.to(tl.float16, fp_downcast_rounding="rtz")  # towards zero
    away = (h.to(tl.float32) != x) & ((x > 0) == UP)  # rtz rounded the wrong way: one step up in magnitude
    return tl.where(away, (h.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True), h)


@triton.jit
def _top_bottom(x, valid, f, n_out):
    """Mask of the ``n_out`` largest and ``n_out`` smallest valid entries of ``x (HP, D)``, ties to the lowest flat
    index ``f``: each entry becomes one int64 key, its float order above its index, so that a selection is
    one max (min) reduction instead of a value reduction, then an index reduction."""
    xb = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)  # (-0.0 ties with 0.0, as in torch's sort)
    order = (xb ^ ((xb >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32  # signed order of the floats, high word
    top = tl.where(valid, order | (0x7FFFFFFF - f).to(tl.int64), I64_MIN)  # max: largest x, then lowest f
    bottom = tl.where(valid, order | f.to(tl.int64), I64_MAX)  # min: smallest x, then lowest f
    taken = f < 0
    for _ in range(n_out):
        hit = top == tl.max(tl.max(top, axis=1), axis=0)
        taken = taken | hit
        top = tl.where(hit, I64_MIN, top)
    bottom = tl.where(taken, I64_MAX, bottom)
    for _ in range(n_out):
        hit = bottom == tl.min(tl.min(bottom, axis=1), axis=0)
        taken = taken | hit
        bottom = tl.where(hit, I64_MAX, bottom)
    return taken


@triton.jit(do_not_specialize=["T", "n_tok", "CAP", "VCAP", "NPC", "n_out"])  # they vary: no recompiles mid-run
def _append_kernel(
    X, sxb, sxh, sxt, LO, HI, MID, CODES, SCALE, ZERO, VAL, IDX, PTR,
    H, T, n_tok, CAP, VCAP, NPC, n_out, AT,
    D: tl.constexpr, HP: tl.constexpr, BITS: tl.constexpr, IS_KEY: tl.constexpr, OUT: tl.constexpr,
    SB: tl.constexpr, DYN: tl.constexpr = False,
):
    b = tl.program_id(0)
    if DYN:  # the first token's index is read on the device (a graph-captured launch)
        n0 = tl.load(AT).to(tl.int32)
    else:
        n0 = n_tok
    hh = tl.arange(0, HP)
    c = tl.arange(0, D)
    hm = hh < H
    valid = hm[:, None] & (c[None, :] >= 0)  # (HP, D)
    row = b.to(tl.int64) * H + hh  # (HP,) rows (b, h) of every buffer
    NB: tl.constexpr = D * BITS // 8
    NM: tl.constexpr = (1 << BITS) - 1
    if IS_KEY:
        lo = tl.load(LO + hh[:, None] * D + c[None, :], mask=valid, other=0.0)
        hi = tl.load(HI + hh[:, None] * D + c[None, :], mask=valid, other=1.0)
        span = hi - lo
        span = tl.where(span > 0, span, 1.0)
    if OUT:
        before = tl.load(PTR + row * NPC + (n0 + SB - 1) // SB, mask=hm, other=0)  # (HP,) entries so far
        f = hh[:, None] * D + c[None, :]
    for i in range(T):
        t = n0 + i
        x = tl.load(X + b * sxb + hh[:, None] * sxh + i * sxt + c[None, :], mask=valid, other=0.0).to(tl.float32)
        if IS_KEY:
            y = tl.math.div_rn(2 * (x - lo), span) - 1
            if OUT:
                out = valid & ((x < lo) | (x > hi))
        else:
            if OUT:
                out = _top_bottom(x, valid, f, n_out)
                inl = valid & ~out
            else:
                inl = valid
            mn = tl.min(tl.where(inl, x, float("inf")), axis=1)  # (HP,)
            mx = tl.max(tl.where(inl, x, -float("inf")), axis=1)
            empty = mn == float("inf")  # every entry of the head is an outlier: its own range
            mn = tl.where(empty, tl.min(tl.where(valid, x, float("inf")), axis=1), mn)
            mx = tl.where(empty, tl.max(tl.where(valid, x, -float("inf")), axis=1), mx)
            zero16 = _fp16_outward(mn, False)
            scale16 = _fp16_outward(mx - zero16.to(tl.float32), True)
            tl.store(ZERO + row * CAP + t, zero16, mask=hm)
            tl.store(SCALE + row * CAP + t, scale16, mask=hm)
            z = zero16.to(tl.float32)[:, None]
            span = (z + scale16.to(tl.float32)[:, None]) - z
            y = tl.math.div_rn(2 * (x - z), tl.where(span > 0, span, 1.0)) - 1
        y = tl.minimum(tl.maximum(y, -1.0), 1.0)
        _store_codes(CODES, (row * CAP + t) * NB, hm, _nearest(y, MID, NM), BITS, D, HP)
        if OUT:
            dest = before[:, None] + tl.cumsum(out.to(tl.int32), axis=1) - 1  # (HP, D) slots of this token's
            at = row[:, None] * VCAP + dest
            tl.store(VAL + at, x.to(tl.float16), mask=out)
            tl.store(IDX + at, ((t % SB) * D + c[None, :] + 0 * dest).to(tl.int16), mask=out)
            before += tl.sum(out.to(tl.int32), axis=1)
            tl.store(PTR + row * NPC + t // SB + 1, before, mask=hm)


def append_kvquant(x: Tensor, codes: Tensor, n: int, mids: Tensor, bits: int, *, lo: Tensor | None = None,
                   hi: Tensor | None = None, scale: Tensor | None = None, zero: Tensor | None = None, n_out: int = 0,
                   rows: SparseRows | None = None, num_warps: int | None = None, at: Tensor | None = None) -> None:
    """Quantize ``x (B, H, T, D)`` (any float dtype) into tokens ``[n, n + T)`` of a kvquant stream's buffers.
    ``at``: int64 ``(1,)`` on the device holding ``n`` (read by the kernel: a graph-captured launch; the host's
    ``n`` and ``rows.n`` are then not checked).

    ``codes``: uint8 ``(B, H, CAP, D * bits / 8)``; ``mids``: float32 ``(2^bits - 1,)`` codebook midpoints.
    Keys: ``lo``, ``hi`` float32 ``(H, D)`` thresholds. Values: ``scale``, ``zero`` float16 ``(B, H, CAP, 1)``
    and ``n_out`` outliers per side of each token (0: none). ``rows``: the stream's outliers, whose token count
    is ``n`` and which has room reserved (keys: all entries beyond the thresholds; values: the top/bottom
    ``n_out``); None when the method keeps none. Nothing is advanced: the caller moves its counters.
    """
    b, h, t, d = x.shape
    key = lo is not None
    check_head_dim(d, bits)
    if codes.shape[:2] != (b, h) or codes.shape[3] != packed_bytes(d, bits) or n + t > codes.shape[2]:
        raise ValueError(f"codes {tuple(codes.shape)} cannot take {t} tokens at {n} of {tuple(x.shape)}")
    if key == (scale is not None) or (rows is not None and rows.n != n and at is None):
        raise ValueError("keys take lo/hi, values scale/zero; rows must hold exactly the first n tokens")
    if x.stride(-1) != 1:
        x = x.contiguous()
    hp = next_pow2(h)
    dummy = codes  # placeholders for pointers a specialization does not read
    _append_kernel[(b,)](
        x, *x.stride()[:3], lo if key else dummy, hi if key else dummy, mids, codes,
        dummy if key else scale, dummy if key else zero,
        *((rows.val, rows.idx, rows.ptr) if rows is not None else (dummy,) * 3),
        h, t, n, codes.shape[2], rows.val.shape[-1] if rows is not None else 0,
        rows.ptr.shape[-1] if rows is not None else 0, n_out, codes if at is None else at,
        D=d, HP=hp, BITS=bits, IS_KEY=key, OUT=rows is not None, SB=rows.block if rows is not None else 1,
        DYN=at is not None,
        num_warps=num_warps or (8 if hp * d >= 2048 else 4),
    )
