"""Triton decode attention over a MILLION product-quantization cache (layout, reference: ``kvq_kernels.vq_reference``).

One query token per sequence: ``q (B, H*G, D)`` post-RoPE (PQ keys are quantized after RoPE). First the
per-query score table ``T[b, i, m, j] = (q_m . ck[m, j]) * scale`` for every subspace m and centroid j
(``(B, H*G, M, 2^b)`` float32, one batched GEMM: 64 KiB per query head at M = 64, 8 bits, so the tables
stay in L2). Then, grid ``(B*H, n_splits + 1)`` as ``decode_attention``: program ``(bh, s < n_splits)`` walks
its chunk of packed tokens; a block's key codes ``(BLOCK_N, M)`` are read once from the bit-stream rows and
each of the G query heads' scores is ``sum_m T[m, code_m]`` (a gather from its table, no key is ever
decoded); values are decoded by gathering ``cv[m, code_m]`` (the shared value codebook, per half of the
head). The last program attends over the fp16 sink and residual; ``decode_attention``'s reduce kernel
merges the partials (``decode_split``: the building blocks of every split program, here with ``FMA``: float32
products on CUDA cores).

Per-head codebooks (``ck, cv (H, M, K, D/M)``) and a key channel order (``PQCache.key_order``) are handled
where the tables are built (on the host); a KV head's program gathers its values from ``cv[h]``.

Layout requirements (``supported``): D, M and ``D / M`` powers of two, ``M >= 2``.

Public function:
    decode_attention_pq(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None) -> out
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import decode_mma_pq
from .decode_attention import DOT_PRECISION, DOT_PRECISION_16, _finish, check_query, vq_plan
from .decode_split import (
    _fp16_segments,
    _init_state,
    _load_query,
    _mask,
    _program_ids,
    _split_range,
    _store_partial,
    _update,
)
from .reference import next_pow2
from .vq_pack import _load_vq_codes, code_span
from .vq_reference import PQCache, row_bytes

#: GQA at head dim 128, 64 subspaces of 8-bit codes: the packed splits by ``decode_mma_pq``'s tensor-core program
PQ_MMA = True


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def supported(head_dim: int, subspaces: int) -> bool:
    """Whether the kernel's layout holds a PQ configuration (see the module docstring)."""
    return _pow2(head_dim) and _pow2(subspaces) and 2 <= subspaces <= head_dim


@triton.jit
def _pq_half(row_ptr, valid, CB, HIDX: tl.constexpr, M: tl.constexpr, K: tl.constexpr, DM: tl.constexpr,
             BITS: tl.constexpr, SPAN: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dims of half ``HIDX`` of ``BLOCK_N`` tokens: subspaces ``[HIDX*M/2, (HIDX+1)*M/2)`` gathered from the
    shared codebook ``CB (M, K, DM)`` -> float32 ``(BLOCK_N, D/2)``."""
    NH: tl.constexpr = M // 2
    codes = _load_vq_codes(row_ptr, valid, HIDX * NH, NH, BITS, SPAN, NB, BLOCK_N)  # (BLOCK_N, NH)
    sub = HIDX * NH + tl.arange(0, NH)
    off = (sub[None, :] * K + codes)[:, :, None] * DM + tl.arange(0, DM)[None, None, :]
    return tl.reshape(tl.load(CB + off).to(tl.float32), (BLOCK_N, NH * DM))


@triton.jit
def _pq_split_kernel(
    Q, sqb, sqh, TAB, KC, VC, CV, cv_sh,
    SK, SV, RK, RV, ssb, ssh, srb, srh,
    MP, LP, AP,
    H, Tmax, n_packed, n_sink, n_res, tokens_per_split, NSP, qk_scale, LENS,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, SPAN: tl.constexpr,
    NB: tl.constexpr, BLOCK_N: tl.constexpr, SEG_ONLY: tl.constexpr = False, PREC: tl.constexpr = "ieee",
    DYN: tl.constexpr = False,
):
    """One program per (b, KV head) and split: score tables ``(GP, M, K)``, value tiles ``(BLOCK_N, D/2)``.
    ``SEG_ONLY``: launched with one split, the last (the fp16 segments; ``decode_mma_pq`` does the packed ones), at
    ``GP >= 16`` rows with ``tl.dot`` products of precision ``PREC`` (float32 products on CUDA cores took 28 µs for 128
    residual tokens on the H200, the tensor-core program's packed splits at 128K 97 µs). ``DYN``: the counts read
    from ``LENS`` (``decode_split._counts``)."""
    HALF: tl.constexpr = D // 2
    K: tl.constexpr = 1 << BITS
    DM: tl.constexpr = D // M
    b, h, hq0, sp, prow0 = _program_ids(H, NSP, G, G, SEG_ONLY)
    q1, q2 = _load_query(Q, sqb, sqh, b, hq0, qk_scale, G, GP, D)  # for the fp16 segments
    CVH = CV + h * cv_sh  # this KV head's value codebook (cv_sh = 0: shared by the heads)
    bh = (b * H + h).to(tl.int64)
    gq = tl.arange(0, GP)
    tab = TAB + (bh * G + gq) * (M * K)  # (GP,) this KV head's query heads' tables
    gmask = (gq < G)[:, None, None]
    sub = tl.arange(0, M)
    m, l, pm, acc1, acc2 = _init_state(GP, BLOCK_N, HALF, 1, True)
    npk, nrs, start, end = _split_range(LENS, n_packed, n_res, tokens_per_split, NSP, sp, BLOCK_N, DYN)
    if not SEG_ONLY:  # a segment-only launch compiles without the packed loop
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            valid = t < end
            row = bh * Tmax + t
            codes = _load_vq_codes(KC + row * NB, valid, 0, M, BITS, SPAN, NB, BLOCK_N)  # (BLOCK_N, M)
            off = (sub[None, :] * K + codes)[None, :, :]  # (1, BLOCK_N, M)
            entries = tl.load(tab[:, None, None] + off, mask=gmask & valid[None, :, None], other=0.0)
            s = _mask(tl.sum(entries, axis=2), valid, True)  # (GP, BLOCK_N)
            vp = VC + row * NB
            v1 = _pq_half(vp, valid, CVH, 0, M, K, DM, BITS, SPAN, NB, BLOCK_N)
            v2 = _pq_half(vp, valid, CVH, 1, M, K, DM, BITS, SPAN, NB, BLOCK_N)
            m, l, pm, acc1, acc2 = _update(s, v1, v2, m, l, pm, acc1, acc2, True, "ieee", FMA=True)
    m, l, pm, acc1, acc2 = _fp16_segments(q1, q2, SK, SV, RK, RV, b.to(tl.int64) * ssb + h * ssh,
                                          b.to(tl.int64) * srb + h * srh, sp == NSP - 1, n_sink, npk, nrs, q1, Q, 0,
                                          q1, q1, m, l, pm, acc1, acc2, False, D, BLOCK_N, True, PREC,
                                          FMA=not SEG_ONLY)
    _store_partial(MP, LP, AP, prow0, NSP, m, l, acc1, acc2, G, GP, D, True)


def score_table(q: Tensor, codebook: Tensor, scale: float) -> Tensor:
    """``scale * q_m . ck[m, j]``: q ``(B, Hq, D)``, codebook ``(M, K, D/M)`` -> float32 ``(B, Hq, M, K)``.

    Per-head codebooks ``(H, M, K, D/M)``: query head i uses KV head ``i // (Hq / H)``'s."""
    b, hq, d = q.shape
    if codebook.dim() == 4:
        h, m = codebook.shape[:2]
        qm = (q.float() * scale).reshape(b, h, hq // h, m, d // m).permute(1, 3, 0, 2, 4)  # (H, M, B, G, dm)
        qm = qm.reshape(h * m, b * (hq // h), d // m)
        t = torch.bmm(qm, codebook.float().reshape(h * m, -1, d // m).transpose(1, 2))  # (H*M, B*G, K)
        return t.reshape(h, m, b, hq // h, -1).permute(2, 0, 3, 1, 4).reshape(b, hq, m, -1).contiguous()
    m = codebook.shape[0]
    qm = (q.float() * scale).reshape(b * hq, m, d // m).transpose(0, 1)  # (M, B*Hq, dm)
    return torch.bmm(qm, codebook.float().transpose(1, 2)).transpose(0, 1).reshape(b, hq, m, -1).contiguous()


def decode_attention_pq(q: Tensor, cache: PQCache, sm_scale: float | None = None, num_splits: int | None = None,
                        block_n: int | None = None, num_warps: int | None = None, lens: Tensor | None = None) -> Tensor:
    """Decode attention of post-RoPE ``q (B, H*G, D)`` over a ``PQCache`` -> ``(B, H*G, D)`` in q's dtype. With
    ``PQ_MMA`` (and no ``block_n`` / ``num_splits`` asked for) the packed splits run ``decode_mma_pq``'s tensor-core
    program where it supports the cache (``pq_mma_supported``), and this one the fp16 segments. ``lens``: int64
    ``[n_packed, n_res, ...]`` on the device, read by the kernels instead of the cache's counts (a launch captured in
    a CUDA graph; the split plan covers the capacity)."""
    b, h, tmax, nb = cache.k_codes.shape
    d, msub = cache.head_dim, cache.subspaces
    if not supported(d, msub) or nb != row_bytes(msub, cache.bits) or cache.v_codes.shape != cache.k_codes.shape:
        raise ValueError(f"pq layout not supported by the kernel: head_dim {d}, {msub} subspaces, rows {nb} B")
    if cache.ck.dim() != cache.cv.dim() or (cache.ck.dim() == 4 and cache.ck.shape[0] != h):
        raise ValueError(f"pq codebooks {tuple(cache.ck.shape)} / {tuple(cache.cv.shape)} do not fit {h} KV heads")
    g = check_query(q, h, d)
    gp = next_pow2(g)
    mma = PQ_MMA and num_splits is None and block_n is None and decode_mma_pq.pq_mma_supported(q, cache)
    if block_n is None:  # the score gather tile is (GP, BLOCK_N, M)
        block_n = max(16, min(64, 8192 // (gp * msub)))
    if num_warps is None:
        num_warps = 8 if gp * block_n * msub >= 8192 else 4
    dyn = lens is not None
    per, nsp, partials, scale = vq_plan(q, cache, mma, decode_mma_pq.pq_split, block_n, num_splits, sm_scale, lens)
    if mma:
        decode_mma_pq.launch_pq_mma(q, cache, *partials, per, nsp, scale, lens)
        table = q  # not read: the segment split has no packed tokens
    else:
        table = score_table(cache.table_query(q), cache.ck, scale)
    sk, rk = cache.sink_k, cache.res_k
    cv = cache.cv.contiguous()
    cv_sh = cv[0].numel() if cv.dim() == 4 else 0
    _pq_split_kernel[(b * h, 1 if mma else nsp)](
        q, q.stride(0), q.stride(1), table, cache.k_codes, cache.v_codes, cv, cv_sh,
        sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1), rk.stride(0), rk.stride(1),
        *partials,
        h, tmax, cache.n_packed, cache.n_sink, cache.n_res, per, nsp, scale, lens if dyn else q,
        G=g, GP=max(16, gp) if mma else gp, D=d, M=msub, BITS=cache.bits, SPAN=code_span(cache.bits), NB=nb,
        BLOCK_N=block_n, SEG_ONLY=mma, PREC=(DOT_PRECISION if q.dtype == torch.float32 else DOT_PRECISION_16)
        if mma else "ieee", DYN=dyn, num_warps=num_warps,
    )
    return _finish(q, nsp, *partials)
