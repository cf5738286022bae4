"""Triton decode attention that reads the packed KV cache directly (layout: ``kvq_kernels.reference``).

One query token per sequence: ``q (B, H*G, D)``, post-RoPE. Work split: grid ``(B*H, n_splits + 1)``. Program
``(bh, s)`` with ``s < n_splits`` walks its chunk of the packed tokens in blocks of ``BLOCK_N``: it loads the
packed code bytes of each half of the head, expands them in registers (shift/mask + joins), looks the
codes up in the codebook (a 2^b-entry table, L1 resident), restores the sparse outliers (fixed slots:
compare + select), and, for kvquant, applies RoPE on the fly: a key at position ``p0 + j`` (``p0`` the block
start) is rotated by a per-program table ``cos/sin(j * inv_freq)``, and the query by ``-p0`` once per block,
since ``q . R(p0 + j) k = (R(p0)^T q) . (R(j) k)``. The G query heads of the KV head share every K/V read.
Program ``(bh, n_splits)`` handles the fp16 sink and residual segments. Each program writes its running
max / sum / unnormalized output (log2 domain); a reduce kernel merges them.

Public functions:
    decode_attention_kvquant(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None) -> out
    decode_attention_kivi(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None) -> out
    dequantize_packed_kvquant(cache, out_k, out_v, offset=0)   packed segment -> fp16 (keys RoPE'd)
    dequantize_packed_kivi(cache, out_k, out_v, offset=0)      (the "dequantize, then SDPA" path)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pack import _load_codes_half
from .reference import KIVI_KEY_GROUP, KIVICache, KVQuantCache, value_group

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _scores(q1, q2, k1, k2, GP: tl.constexpr):
    """``q (GP, HALF)`` x ``k (N, HALF)`` halves -> ``(GP, N)``."""
    return tl.sum(q1[:, None, :] * k1[None, :, :], axis=2) + tl.sum(q2[:, None, :] * k2[None, :, :], axis=2)


@triton.jit
def _online(s, v1, v2, m, l, acc1, acc2, GP: tl.constexpr):
    """Online-softmax update with log2-domain scores ``s (GP, N)`` (masked entries -inf)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * v1[None, :, :], axis=1)
    acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * v2[None, :, :], axis=1)
    return m_new, l, acc1, acc2


@triton.jit
def _rotate_query(q1, q2, INVF, p0, HALF: tl.constexpr):
    """``R(p0)^T q`` (HF rotate_half convention), ``p0`` a scalar position."""
    ang = tl.load(INVF + tl.arange(0, HALF)) * p0
    c0 = tl.cos(ang)[None, :]
    s0 = tl.sin(ang)[None, :]
    return q1 * c0 + q2 * s0, q2 * c0 - q1 * s0


@triton.jit
def _replace_slots(x1, x2, OI, OV, row, valid, NO: tl.constexpr, HALF: tl.constexpr):
    """Sparse outliers: ``x[n, OI[row n, s]] = OV[row n, s]`` for every used slot (index -1 = unused)."""
    ch = tl.arange(0, HALF)
    for s in tl.static_range(NO):
        oi = tl.load(OI + row * NO + s, mask=valid, other=-1).to(tl.int32)
        ov = tl.load(OV + row * NO + s, mask=valid, other=0.0).to(tl.float32)
        x1 = tl.where(ch[None, :] == oi[:, None], ov[:, None], x1)
        x2 = tl.where((ch + HALF)[None, :] == oi[:, None], ov[:, None], x2)
    return x1, x2


@triton.jit
def _fp16_segment(q1, q2, K, V, base, n, pos0, cj, sj, INVF, m, l, acc1, acc2,
                  ROPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr):
    """Attend over ``n`` fp16 tokens at ``K/V + base`` (rows of D), positions ``pos0 + i``."""
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
            qr1, qr2 = _rotate_query(q1, q2, INVF, pos0 + t0, HALF)
            s = _scores(qr1, qr2, k1 * cj - k2 * sj, k2 * cj + k1 * sj, GP)
        else:  # q made loop-variant (+ 0 * t0): works around a Triton 3.6 layout-pass bug (GQA, two loops)
            s = _scores(q1 + 0.0 * t0, q2 + 0.0 * t0, k1, k2, GP)
        s = tl.where(valid[None, :], s, -float("inf"))
        m, l, acc1, acc2 = _online(s, v1, v2, m, l, acc1, acc2, GP)
    return m, l, acc1, acc2


@triton.jit
def _store_partial(MP, LP, AP, pid_bh, sp, NSP, m, l, acc1, acc2, GP: tl.constexpr, D: tl.constexpr):
    HALF: tl.constexpr = D // 2
    g = tl.arange(0, GP)
    ch = tl.arange(0, HALF)
    prow = (pid_bh.to(tl.int64) * NSP + sp) * GP + g
    tl.store(MP + prow, m)
    tl.store(LP + prow, l)
    tl.store(AP + prow[:, None] * D + ch[None, :], acc1)
    tl.store(AP + prow[:, None] * D + HALF + ch[None, :], acc2)


@triton.jit
def _load_query(Q, sqb, sqh, b, h, qk_scale, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    HALF: tl.constexpr = D // 2
    g = tl.arange(0, GP)
    ch = tl.arange(0, HALF)
    qp = Q + b * sqb + (h * G + g)[:, None] * sqh + ch[None, :]
    q1 = tl.load(qp, mask=(g < G)[:, None], other=0.0).to(tl.float32) * qk_scale
    q2 = tl.load(qp + HALF, mask=(g < G)[:, None], other=0.0).to(tl.float32) * qk_scale
    return q1, q2


# ----------------------------------------------------------------------------------------------- kvquant
@triton.jit
def _kvquant_split_kernel(
    Q, sqb, sqh,
    KP, KOI, KOV, KA, KSC, CK,
    VP, VMIN, VSC, VOI, VOV, CV,
    SK, SV, RK, RV, ssb, ssh, srb, srh,
    INVF, MP, LP, AP,
    H, Tmax, n_packed, n_sink, n_res, tokens_per_split, NSP, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr,
    NOK: tl.constexpr, NOV: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    q1, q2 = _load_query(Q, sqb, sqh, b, h, qk_scale, G, GP, D)
    # RoPE table for offsets j in [0, BLOCK_N) inside a block
    ang = tl.arange(0, BLOCK_N).to(tl.float32)[:, None] * tl.load(INVF + ch)[None, :]
    cj = tl.cos(ang)
    sj = tl.sin(ang)
    m = tl.full((GP,), -float("inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc1 = tl.zeros((GP, HALF), tl.float32)
    acc2 = tl.zeros((GP, HALF), tl.float32)
    # the last program (sp == NSP - 1) has an empty packed range and does the fp16 segments; no
    # branch on sp (Triton 3.6 mis-compiles the GQA variant of the if/else form)
    last = sp == NSP - 1
    NBK: tl.constexpr = D * BITS_K // 8
    NBV: tl.constexpr = D * BITS_V // 8
    a1 = tl.load(KA + h * D + ch)[None, :]
    a2 = tl.load(KA + h * D + HALF + ch)[None, :]
    s1 = tl.load(KSC + h * D + ch)[None, :]
    s2 = tl.load(KSC + h * D + HALF + ch)[None, :]
    start = sp * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_packed)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        row = pid_bh.to(tl.int64) * Tmax + t
        # keys: codes -> codebook -> per-channel affine -> outliers -> RoPE(j) ; query rotated by -p0
        kp = KP + row * NBK
        k1 = a1 + s1 * tl.load(CK + _load_codes_half(kp, valid, 0, BITS_K, D, BLOCK_N))
        k2 = a2 + s2 * tl.load(CK + _load_codes_half(kp, valid, 1, BITS_K, D, BLOCK_N))
        k1, k2 = _replace_slots(k1, k2, KOI, KOV, row, valid, NOK, HALF)
        qr1, qr2 = _rotate_query(q1, q2, INVF, n_sink + t0, HALF)
        s = _scores(qr1, qr2, k1 * cj - k2 * sj, k2 * cj + k1 * sj, GP)
        s = tl.where(valid[None, :], s, -float("inf"))
        # values: codes -> codebook -> per-token min/scale -> outliers
        hs = 0.5 * tl.load(VSC + row, mask=valid, other=0.0).to(tl.float32)
        mn = tl.load(VMIN + row, mask=valid, other=0.0).to(tl.float32) + hs
        vp = VP + row * NBV
        v1 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, valid, 0, BITS_V, D, BLOCK_N))
        v2 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, valid, 1, BITS_V, D, BLOCK_N))
        v1, v2 = _replace_slots(v1, v2, VOI, VOV, row, valid, NOV, HALF)
        m, l, acc1, acc2 = _online(s, v1, v2, m, l, acc1, acc2, GP)
    n_s = tl.where(last, n_sink, 0)
    n_r = tl.where(last, n_res, 0)
    m, l, acc1, acc2 = _fp16_segment(q1, q2, SK, SV, b.to(tl.int64) * ssb + h * ssh, n_s, 0, cj, sj, INVF,
                                     m, l, acc1, acc2, True, D, BLOCK_N, GP)
    m, l, acc1, acc2 = _fp16_segment(q1, q2, RK, RV, b.to(tl.int64) * srb + h * srh, n_r, n_sink + n_packed, cj, sj,
                                     INVF, m, l, acc1, acc2, True, D, BLOCK_N, GP)
    _store_partial(MP, LP, AP, pid_bh, sp, NSP, m, l, acc1, acc2, GP, D)


# ----------------------------------------------------------------------------------------------- kivi
@triton.jit
def _kivi_split_kernel(
    Q, sqb, sqh,
    KP, KS, KZ, VP, VS, VZ,
    SK, SV, RK, RV, ssb, ssh, srb, srh,
    MP, LP, AP,
    H, Tmax, NGmax, n_packed, n_sink, n_res, tokens_per_split, NSP, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, KG: tl.constexpr,
    VG: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    q1, q2 = _load_query(Q, sqb, sqh, b, h, qk_scale, G, GP, D)
    m = tl.full((GP,), -float("inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc1 = tl.zeros((GP, HALF), tl.float32)
    acc2 = tl.zeros((GP, HALF), tl.float32)
    # the last program (sp == NSP - 1) has an empty packed range and does the fp16 segments; no
    # branch on sp (Triton 3.6 mis-compiles the GQA variant of the if/else form)
    last = sp == NSP - 1
    NB: tl.constexpr = D * BITS // 8
    NVG: tl.constexpr = D // VG
    start = sp * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_packed)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        row = pid_bh.to(tl.int64) * Tmax + t
        # keys: per-channel scale/zero of the token's group of KG tokens
        grow = pid_bh.to(tl.int64) * NGmax + t // KG
        goff = grow[:, None] * D + ch[None, :]
        kp = KP + row * NB
        c1 = _load_codes_half(kp, valid, 0, BITS, D, BLOCK_N).to(tl.float32)
        c2 = _load_codes_half(kp, valid, 1, BITS, D, BLOCK_N).to(tl.float32)
        k1 = tl.load(KZ + goff, mask=valid[:, None], other=0.0).to(tl.float32) + c1 * tl.load(
            KS + goff, mask=valid[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(KZ + goff + HALF, mask=valid[:, None], other=0.0).to(tl.float32) + c2 * tl.load(
            KS + goff + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
        s = _scores(q1, q2, k1, k2, GP)
        s = tl.where(valid[None, :], s, -float("inf"))
        # values: per-token scale/zero of each group of VG channels
        vp = VP + row * NB
        d1 = _load_codes_half(vp, valid, 0, BITS, D, BLOCK_N).to(tl.float32)
        d2 = _load_codes_half(vp, valid, 1, BITS, D, BLOCK_N).to(tl.float32)
        if VG >= HALF:  # each half lies in one channel group
            gz1 = tl.load(VZ + row * NVG + 0, mask=valid, other=0.0).to(tl.float32)
            gs1 = tl.load(VS + row * NVG + 0, mask=valid, other=0.0).to(tl.float32)
            gz2 = tl.load(VZ + row * NVG + HALF // VG, mask=valid, other=0.0).to(tl.float32)
            gs2 = tl.load(VS + row * NVG + HALF // VG, mask=valid, other=0.0).to(tl.float32)
            v1 = gz1[:, None] + d1 * gs1[:, None]
            v2 = gz2[:, None] + d2 * gs2[:, None]
        else:  # (N, groups, VG) view: one scale/zero load per group, broadcast over its channels
            NGH: tl.constexpr = HALF // VG
            cg = tl.arange(0, NGH)
            soff = row[:, None] * NVG + cg[None, :]
            gz1 = tl.load(VZ + soff, mask=valid[:, None], other=0.0).to(tl.float32)
            gs1 = tl.load(VS + soff, mask=valid[:, None], other=0.0).to(tl.float32)
            gz2 = tl.load(VZ + soff + NGH, mask=valid[:, None], other=0.0).to(tl.float32)
            gs2 = tl.load(VS + soff + NGH, mask=valid[:, None], other=0.0).to(tl.float32)
            v1 = tl.reshape(gz1[:, :, None] + tl.reshape(d1, (BLOCK_N, NGH, VG)) * gs1[:, :, None],
                            (BLOCK_N, HALF))
            v2 = tl.reshape(gz2[:, :, None] + tl.reshape(d2, (BLOCK_N, NGH, VG)) * gs2[:, :, None],
                            (BLOCK_N, HALF))
        m, l, acc1, acc2 = _online(s, v1, v2, m, l, acc1, acc2, GP)
    n_s = tl.where(last, n_sink, 0)
    n_r = tl.where(last, n_res, 0)
    m, l, acc1, acc2 = _fp16_segment(q1, q2, SK, SV, b.to(tl.int64) * ssb + h * ssh, n_s, 0, q1, q1, Q,
                                     m, l, acc1, acc2, False, D, BLOCK_N, GP)
    m, l, acc1, acc2 = _fp16_segment(q1, q2, RK, RV, b.to(tl.int64) * srb + h * srh, n_r, 0, q1, q1, Q,
                                     m, l, acc1, acc2, False, D, BLOCK_N, GP)
    _store_partial(MP, LP, AP, pid_bh, sp, NSP, m, l, acc1, acc2, GP, D)


# ----------------------------------------------------------------------------------------------- reduce
@triton.jit
def _reduce_kernel(MP, LP, AP, O, sob, soh, H, NSP, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   NSP_PAD: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // G
    g = pid % G
    s = tl.arange(0, NSP_PAD)
    smask = s < NSP
    prow = (bh.to(tl.int64) * NSP + s) * GP + g
    m = tl.load(MP + prow, mask=smask, other=-float("inf"))
    l = tl.load(LP + prow, mask=smask, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m > -float("inf"), tl.exp2(m - mx), 0.0)
    c = tl.arange(0, D)
    acc = tl.load(AP + prow[:, None] * D + c[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    b = bh // H
    h = bh % H
    tl.store(O + b * sob + (h * G + g) * soh + c, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------------------------- wrappers
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _plan(q: Tensor, heads: int, n_packed: int, block_n: int, num_splits: int | None):
    """Tokens per split program and the number of split programs over the packed segment."""
    b = q.shape[0]
    nblocks = triton.cdiv(n_packed, block_n)
    if nblocks == 0:
        return block_n, 0
    if num_splits is None:
        num_splits = max(1, triton.cdiv(4 * _num_sms(q.device), b * heads))
    num_splits = max(1, min(num_splits, nblocks))
    per = triton.cdiv(nblocks, num_splits) * block_n
    return per, triton.cdiv(n_packed, per)


def _default_block(gp: int, d: int, block_n: int | None, num_warps: int | None) -> tuple[int, int]:
    if block_n is None:  # H100 timings (bench): 64/8 best for MHA, 16/4 for 4 query heads per KV head
        block_n = 64 if gp == 1 else max(16, min(64, 1024 // (gp * d // 2)))
    if num_warps is None:
        num_warps = 8 if block_n * d >= 8192 else 4
    return block_n, num_warps


def _finish(q, heads, g, gp, d, nsp, mp, lp, ap, out):
    _reduce_kernel[(q.shape[0] * heads * g,)](mp, lp, ap, out, out.stride(0), out.stride(1), heads, nsp, G=g,
                                             GP=gp, D=d, NSP_PAD=triton.next_power_of_2(nsp))
    return out


def _partials(q, heads, nsp, gp, d):
    b = q.shape[0]
    mp = torch.empty(b * heads, nsp, gp, dtype=torch.float32, device=q.device)
    lp = torch.empty_like(mp)
    ap = torch.empty(b * heads, nsp, gp, d, dtype=torch.float32, device=q.device)
    return mp, lp, ap


def _check_q(q: Tensor, heads: int, d: int) -> int:
    if q.dim() != 3 or q.shape[-1] != d or q.shape[1] % heads:
        raise ValueError(f"q must be (B, H*G, {d}) with H={heads}, got {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last dim")
    return q.shape[1] // heads


def _launch_plan(q: Tensor, cache, sm_scale, num_splits, block_n, num_warps):
    """Shapes, block sizes, the split-K plan, partial-result buffers and the log2-domain score scale."""
    b, h, tmax, _ = cache.k_packed.shape
    d = cache.head_dim
    g = _check_q(q, h, d)
    gp = triton.next_power_of_2(g)
    block_n, num_warps = _default_block(gp, d, block_n, num_warps)
    per, nsplit = _plan(q, h, cache.n_packed, block_n, num_splits)
    nsp = nsplit + 1  # the last split does the fp16 sink and residual segments
    mp, lp, ap = _partials(q, h, nsp, gp, d)
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    return b, h, tmax, d, g, gp, block_n, num_warps, per, nsp, mp, lp, ap, scale


def decode_attention_kvquant(q: Tensor, cache: KVQuantCache, sm_scale: float | None = None,
                             num_splits: int | None = None, block_n: int | None = None,
                             num_warps: int | None = None) -> Tensor:
    """Decode attention of post-RoPE ``q (B, H*G, D)`` over a ``KVQuantCache`` -> ``(B, H*G, D)`` in q's dtype."""
    b, h, tmax, d, g, gp, block_n, num_warps, per, nsp, mp, lp, ap, scale = _launch_plan(
        q, cache, sm_scale, num_splits, block_n, num_warps)
    ka = ((cache.lo + cache.hi) / 2).contiguous()
    ksc = ((cache.hi - cache.lo) / 2).contiguous()
    invf = cache.rope_frequencies(q.device)
    sk, rk = cache.sink_k, cache.res_k
    for x in (cache.sink_k, cache.sink_v, cache.res_k, cache.res_v):
        if not x.is_contiguous():
            raise ValueError("fp16 sink/residual buffers must be contiguous")
    _kvquant_split_kernel[(b * h, nsp)](
        q, q.stride(0), q.stride(1),
        cache.k_packed, cache.k_oidx, cache.k_oval, ka, ksc, cache.ck,
        cache.v_packed, cache.v_min, cache.v_scale, cache.v_oidx, cache.v_oval, cache.cv,
        sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1), rk.stride(0), rk.stride(1),
        invf, mp, lp, ap,
        h, tmax, cache.n_packed, cache.n_sink, cache.n_res, per, nsp, scale,
        G=g, GP=gp, D=d, BITS_K=cache.bits_k, BITS_V=cache.bits_v, NOK=cache.k_oidx.shape[-1],
        NOV=cache.v_oidx.shape[-1], BLOCK_N=block_n, num_warps=num_warps,
    )
    return _finish(q, h, g, gp, d, nsp, mp, lp, ap, torch.empty_like(q))


def decode_attention_kivi(q: Tensor, cache: KIVICache, sm_scale: float | None = None,
                          num_splits: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None) -> Tensor:
    """Decode attention of post-RoPE ``q (B, H*G, D)`` over a ``KIVICache`` -> ``(B, H*G, D)`` in q's dtype."""
    b, h, tmax, d, g, gp, block_n, num_warps, per, nsp, mp, lp, ap, scale = _launch_plan(
        q, cache, sm_scale, num_splits, block_n, num_warps)
    sk, rk = cache.sink_k, cache.res_k
    _kivi_split_kernel[(b * h, nsp)](
        q, q.stride(0), q.stride(1),
        cache.k_packed, cache.k_scale, cache.k_zero, cache.v_packed, cache.v_scale, cache.v_zero,
        sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1), rk.stride(0), rk.stride(1),
        mp, lp, ap,
        h, tmax, cache.k_scale.shape[2], cache.n_packed, cache.n_sink, cache.n_res, per, nsp, scale,
        G=g, GP=gp, D=d, BITS=cache.bits, KG=KIVI_KEY_GROUP, VG=value_group(d), BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return _finish(q, h, g, gp, d, nsp, mp, lp, ap, torch.empty_like(q))


# ----------------------------------------------------------------------------------------------- dequantize
@triton.jit
def _kvquant_dequant_kernel(
    KP, KOI, KOV, KA, KSC, CK, VP, VMIN, VSC, VOI, VOV, CV, INVF, OK, OV, sob, soh, sot,
    H, Tmax, n_packed, n_sink, offset,
    D: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, NOK: tl.constexpr, NOV: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = t < n_packed
    row = pid_bh.to(tl.int64) * Tmax + t
    kp = KP + row * (D * BITS_K // 8)
    k1 = tl.load(KA + h * D + ch)[None, :] + tl.load(KSC + h * D + ch)[None, :] * tl.load(
        CK + _load_codes_half(kp, valid, 0, BITS_K, D, BLOCK_N))
    k2 = tl.load(KA + h * D + HALF + ch)[None, :] + tl.load(KSC + h * D + HALF + ch)[None, :] * tl.load(
        CK + _load_codes_half(kp, valid, 1, BITS_K, D, BLOCK_N))
    k1, k2 = _replace_slots(k1, k2, KOI, KOV, row, valid, NOK, HALF)
    ang = (n_sink + t).to(tl.float32)[:, None] * tl.load(INVF + ch)[None, :]
    cs = tl.cos(ang)
    sn = tl.sin(ang)
    hs = 0.5 * tl.load(VSC + row, mask=valid, other=0.0).to(tl.float32)
    mn = tl.load(VMIN + row, mask=valid, other=0.0).to(tl.float32) + hs
    vp = VP + row * (D * BITS_V // 8)
    v1 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, valid, 0, BITS_V, D, BLOCK_N))
    v2 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, valid, 1, BITS_V, D, BLOCK_N))
    v1, v2 = _replace_slots(v1, v2, VOI, VOV, row, valid, NOV, HALF)
    o = b.to(tl.int64) * sob + h.to(tl.int64) * soh + (offset + t).to(tl.int64)[:, None] * sot + ch[None, :]
    tl.store(OK + o, (k1 * cs - k2 * sn).to(OK.dtype.element_ty), mask=valid[:, None])
    tl.store(OK + o + HALF, (k2 * cs + k1 * sn).to(OK.dtype.element_ty), mask=valid[:, None])
    tl.store(OV + o, v1.to(OV.dtype.element_ty), mask=valid[:, None])
    tl.store(OV + o + HALF, v2.to(OV.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _kivi_dequant_kernel(
    KP, KS, KZ, VP, VS, VZ, OK, OV, sob, soh, sot,
    H, Tmax, NGmax, n_packed, offset,
    D: tl.constexpr, BITS: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = t < n_packed
    row = pid_bh.to(tl.int64) * Tmax + t
    NB: tl.constexpr = D * BITS // 8
    o = b.to(tl.int64) * sob + h.to(tl.int64) * soh + (offset + t).to(tl.int64)[:, None] * sot + ch[None, :]
    goff = (pid_bh.to(tl.int64) * NGmax + t // KG)[:, None] * D + ch[None, :]
    soff = row[:, None] * (D // VG) + ch[None, :] // VG
    for hh in tl.static_range(2):
        kc = _load_codes_half(KP + row * NB, valid, hh, BITS, D, BLOCK_N).to(tl.float32)
        k = tl.load(KZ + goff + hh * HALF, mask=valid[:, None], other=0.0).to(tl.float32) + kc * tl.load(
            KS + goff + hh * HALF, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(OK + o + hh * HALF, k.to(OK.dtype.element_ty), mask=valid[:, None])
        vc = _load_codes_half(VP + row * NB, valid, hh, BITS, D, BLOCK_N).to(tl.float32)
        so = soff + (hh * HALF) // VG
        v = tl.load(VZ + so, mask=valid[:, None], other=0.0).to(tl.float32) + vc * tl.load(
            VS + so, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(OV + o + hh * HALF, v.to(OV.dtype.element_ty), mask=valid[:, None])


def dequantize_packed_kvquant(cache: KVQuantCache, out_k: Tensor, out_v: Tensor, offset: int = 0,
                              block_n: int = 32) -> None:
    """Write the packed segment, dequantized (keys with outliers, RoPE'd at positions ``n_sink + i``), into
    ``out_k / out_v (B, H, >= offset + n_packed, D)`` at token ``offset``."""
    b, h, tmax, _ = cache.k_packed.shape
    d = cache.head_dim
    if cache.n_packed == 0:
        return
    grid = (b * h, triton.cdiv(cache.n_packed, block_n))
    _kvquant_dequant_kernel[grid](
        cache.k_packed, cache.k_oidx, cache.k_oval, ((cache.lo + cache.hi) / 2).contiguous(),
        ((cache.hi - cache.lo) / 2).contiguous(), cache.ck, cache.v_packed, cache.v_min, cache.v_scale,
        cache.v_oidx, cache.v_oval, cache.cv, cache.rope_frequencies(out_k.device), out_k, out_v,
        out_k.stride(0), out_k.stride(1), out_k.stride(2), h, tmax, cache.n_packed, cache.n_sink, offset,
        D=d, BITS_K=cache.bits_k, BITS_V=cache.bits_v, NOK=cache.k_oidx.shape[-1], NOV=cache.v_oidx.shape[-1],
        BLOCK_N=block_n,
    )


def dequantize_packed_kivi(cache: KIVICache, out_k: Tensor, out_v: Tensor, offset: int = 0,
                           block_n: int = 32) -> None:
    """Write the packed segment, dequantized, into ``out_k / out_v (B, H, >= offset + n_packed, D)``."""
    b, h, tmax, _ = cache.k_packed.shape
    d = cache.head_dim
    if cache.n_packed == 0:
        return
    if out_k.stride() != out_v.stride():
        raise ValueError("out_k and out_v must share strides")
    grid = (b * h, triton.cdiv(cache.n_packed, block_n))
    _kivi_dequant_kernel[grid](
        cache.k_packed, cache.k_scale, cache.k_zero, cache.v_packed, cache.v_scale, cache.v_zero, out_k, out_v,
        out_k.stride(0), out_k.stride(1), out_k.stride(2), h, tmax, cache.k_scale.shape[2], cache.n_packed,
        offset, D=d, BITS=cache.bits, KG=KIVI_KEY_GROUP, VG=value_group(d), BLOCK_N=block_n,
    )
