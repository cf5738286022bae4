"""Chunked-prefill attention over the kvquant-flavour packed cache (Triton), and its PyTorch reference.

A block of ``Tq`` new queries (post-RoPE, positions ``P .. P+Tq-1`` with ``P`` = tokens already cached)
attends to the fp16 sink, the packed history (codes dequantized in registers, RoPE applied on the fly at
each key's own position), the fp16 residual and, causally, to the current chunk's own keys and values in
full precision (``k_new``/``v_new``, post-RoPE). A long prompt is therefore prefilled chunk by chunk
without ever materializing 16-bit K/V of the history. Layout: ``kvq_kernels.reference`` (``KVQuantCache``).

Grid: one program per (batch, query head, block of ``BLOCK_M`` queries); query head ``i`` reads KV head
``i // G``. Scores and the value product use ``tl.dot`` (head_dim >= 32 so each half is >= 16 wide).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .decode_attention import LOG2E, _replace_slots
from .pack import _load_codes_half
from .reference import KVQuantCache, cdiv, dequantize_kvquant_cache


@triton.jit
def _step(q1, q2, k1, k2, v1, v2, valid, m, l, acc1, acc2):
    """One online-softmax step: ``q (M, HALF)`` halves against ``k, v (N, HALF)``; ``valid (M, N)``.

    ``input_precision="ieee"`` (fp32 FMA dots): with tensor cores ("tf32", and also "tf32x3") Triton 3.6 returned
    wrong results on the H100 (relative error 1.77-1.86 on the test shapes, every row); "ieee" gave 3.4e-7."""
    s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
    s = tl.where(valid, s, -float("inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision="ieee")
    acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision="ieee")
    return m_new, l, acc1, acc2


@triton.jit
def _rotate(k1, k2, pos, INVF, HALF: tl.constexpr):
    """RoPE (rotate_half convention) of key halves ``(N, HALF)`` at integer positions ``pos (N,)``."""
    ang = pos.to(tl.float32)[:, None] * tl.load(INVF + tl.arange(0, HALF))[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
    return k1 * c - k2 * s, k2 * c + k1 * s


@triton.jit
def _fp16_segment(q1, q2, K, V, base, n, pos0, INVF, all_q, m, l, acc1, acc2, D: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Attend over ``n`` fp16 tokens at ``K/V + base`` (rows of D, pre-RoPE keys at positions ``pos0 + t``)."""
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    for t0 in range(0, n, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tv = t < n
        off = base + t.to(tl.int64)[:, None] * D + ch[None, :]
        k1, k2 = _rotate(tl.load(K + off, mask=tv[:, None], other=0.0).to(tl.float32),
                         tl.load(K + off + HALF, mask=tv[:, None], other=0.0).to(tl.float32), pos0 + t, INVF, HALF)
        v1 = tl.load(V + off, mask=tv[:, None], other=0.0).to(tl.float32)
        v2 = tl.load(V + off + HALF, mask=tv[:, None], other=0.0).to(tl.float32)
        m, l, acc1, acc2 = _step(q1, q2, k1, k2, v1, v2, all_q & tv[None, :], m, l, acc1, acc2)
    return m, l, acc1, acc2


@triton.jit
def _kvquant_prefill_kernel(
    Q, KN, VN, O, sq_b, sq_h, sq_t, sn_b, sn_h, sn_t, so_b, so_h, so_t,
    KP, KOI, KOV, KA, KSC, CK, VP, VMIN, VSC, VOI, VOV, CV,
    SK, SV, RK, RV, ss_b, ss_h, sr_b, sr_h, INVF,
    H, Tmax, n_packed, n_sink, n_res, Tq, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, NOK: tl.constexpr,
    NOV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    mb = tl.program_id(1)
    b = pid // (H * G)
    hq = pid % (H * G)
    h = hq // G
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # query index in the chunk
    qmask = i < Tq
    qp = Q + b.to(tl.int64) * sq_b + hq * sq_h + i.to(tl.int64)[:, None] * sq_t + ch[None, :]
    q1 = tl.load(qp, mask=qmask[:, None], other=0.0).to(tl.float32) * qk_scale
    q2 = tl.load(qp + HALF, mask=qmask[:, None], other=0.0).to(tl.float32) * qk_scale
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc1 = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc2 = tl.zeros((BLOCK_M, HALF), tl.float32)
    all_q = qmask[:, None]
    # fp16 sink, pre-RoPE keys at positions [0, n_sink)
    m, l, acc1, acc2 = _fp16_segment(q1, q2, SK, SV, b.to(tl.int64) * ss_b + h * ss_h, n_sink, 0, INVF, all_q,
                                     m, l, acc1, acc2, D, BLOCK_N)
    # packed history at positions [n_sink, n_sink + n_packed)
    NBK: tl.constexpr = D * BITS_K // 8
    NBV: tl.constexpr = D * BITS_V // 8
    a1 = tl.load(KA + h * D + ch)[None, :]
    a2 = tl.load(KA + h * D + HALF + ch)[None, :]
    s1 = tl.load(KSC + h * D + ch)[None, :]
    s2 = tl.load(KSC + h * D + HALF + ch)[None, :]
    bh = (b * H + h).to(tl.int64)
    for t0 in range(0, n_packed, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tv = t < n_packed
        row = bh * Tmax + t
        kp = KP + row * NBK
        k1 = a1 + s1 * tl.load(CK + _load_codes_half(kp, tv, 0, BITS_K, D, BLOCK_N))
        k2 = a2 + s2 * tl.load(CK + _load_codes_half(kp, tv, 1, BITS_K, D, BLOCK_N))
        k1, k2 = _replace_slots(k1, k2, KOI, KOV, row, tv, NOK, HALF)
        k1, k2 = _rotate(k1, k2, n_sink + t, INVF, HALF)
        hs = 0.5 * tl.load(VSC + row, mask=tv, other=0.0).to(tl.float32)
        mn = tl.load(VMIN + row, mask=tv, other=0.0).to(tl.float32) + hs
        vp = VP + row * NBV
        v1 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, tv, 0, BITS_V, D, BLOCK_N))
        v2 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, tv, 1, BITS_V, D, BLOCK_N))
        v1, v2 = _replace_slots(v1, v2, VOI, VOV, row, tv, NOV, HALF)
        m, l, acc1, acc2 = _step(q1, q2, k1, k2, v1, v2, all_q & tv[None, :], m, l, acc1, acc2)
    # fp16 residual, pre-RoPE keys at positions [n_sink + n_packed, P)
    m, l, acc1, acc2 = _fp16_segment(q1, q2, RK, RV, b.to(tl.int64) * sr_b + h * sr_h, n_res, n_sink + n_packed,
                                     INVF, all_q, m, l, acc1, acc2, D, BLOCK_N)
    # the current chunk, post-RoPE, full precision, causal (key j <= query i); only blocks up to this query block
    base = b.to(tl.int64) * sn_b + h * sn_h
    for t0 in range(0, (mb + 1) * BLOCK_M, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tv = t < Tq
        off = base + t.to(tl.int64)[:, None] * sn_t + ch[None, :]
        k1 = tl.load(KN + off, mask=tv[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(KN + off + HALF, mask=tv[:, None], other=0.0).to(tl.float32)
        v1 = tl.load(VN + off, mask=tv[:, None], other=0.0).to(tl.float32)
        v2 = tl.load(VN + off + HALF, mask=tv[:, None], other=0.0).to(tl.float32)
        causal = all_q & tv[None, :] & (t[None, :] <= i[:, None])
        m, l, acc1, acc2 = _step(q1, q2, k1, k2, v1, v2, causal, m, l, acc1, acc2)
    l = tl.where(l > 0, l, 1.0)
    op = O + b.to(tl.int64) * so_b + hq * so_h + i.to(tl.int64)[:, None] * so_t + ch[None, :]
    tl.store(op, acc1 / l[:, None], mask=qmask[:, None])
    tl.store(op + HALF, acc2 / l[:, None], mask=qmask[:, None])


def prefill_attention_kvquant(q: Tensor, cache: KVQuantCache, k_new: Tensor, v_new: Tensor,
                              sm_scale: float | None = None, block_m: int = 16, block_n: int = 32,
                              num_warps: int = 4) -> Tensor:
    """Attention of a chunk's queries over the packed cache plus the chunk itself, causally.

    Parameters
    ----------
    q : ``(B, H*G, Tq, D)`` post-RoPE queries at positions ``P .. P+Tq-1`` (``P`` = tokens in ``cache``).
    cache : the packed history (sink, packed, residual; keys pre-RoPE).
    k_new, v_new : ``(B, H, Tq, D)`` the chunk's own keys (post-RoPE) and values, full precision.

    Returns float32 ``(B, H*G, Tq, D)``.
    """
    b, hq, tq, d = q.shape
    h = cache.k_packed.shape[1]
    if d < 32 or d & (d - 1) or hq % h or k_new.shape != (b, h, tq, d) or v_new.shape != k_new.shape:
        raise ValueError(f"q (B, H*G, Tq, D>=32 power of 2) and k_new/v_new (B, H, Tq, D); got {tuple(q.shape)}, "
                         f"{tuple(k_new.shape)} for H={h}")
    if k_new.stride() != v_new.stride() or q.stride(-1) != 1 or k_new.stride(-1) != 1:
        raise ValueError("q, k_new and v_new must be contiguous in their last dim, k_new/v_new alike")
    for x in (cache.sink_k, cache.sink_v, cache.res_k, cache.res_v):
        if not x.is_contiguous():
            raise ValueError("fp16 sink/residual buffers must be contiguous")
    out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    sk, rk = cache.sink_k, cache.res_k
    grid = (b * hq, cdiv(tq, block_m))
    _kvquant_prefill_kernel[grid](
        q, k_new, v_new, out, q.stride(0), q.stride(1), q.stride(2), k_new.stride(0), k_new.stride(1),
        k_new.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cache.k_packed, cache.k_oidx, cache.k_oval, ((cache.lo + cache.hi) / 2).contiguous(),
        ((cache.hi - cache.lo) / 2).contiguous(), cache.ck, cache.v_packed, cache.v_min, cache.v_scale,
        cache.v_oidx, cache.v_oval, cache.cv, sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1),
        rk.stride(0), rk.stride(1), cache.rope_frequencies(q.device),
        h, cache.k_packed.shape[2], cache.n_packed, cache.n_sink, cache.n_res, tq, scale,
        G=hq // h, D=d, BITS_K=cache.bits_k, BITS_V=cache.bits_v, NOK=cache.k_oidx.shape[-1],
        NOV=cache.v_oidx.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


def prefill_attention_kvquant_ref(q: Tensor, cache: KVQuantCache, k_new: Tensor, v_new: Tensor,
                                  sm_scale: float | None = None) -> Tensor:
    """Reference: dequantize the whole history, append the chunk, causal softmax attention (float32)."""
    k, v = dequantize_kvquant_cache(cache)  # (B, H, P, D) post-RoPE
    k = torch.cat([k, k_new.float()], 2)
    v = torch.cat([v, v_new.float()], 2)
    b, hq, tq, d = q.shape
    h, total = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qf = q.float().reshape(b, h, hq // h, tq, d)  # (B, H, G, Tq, D)
    s = torch.einsum("bhgtd,bhld->bhgtl", qf, k) * scale
    future = torch.arange(total, device=q.device)[None, :] > torch.arange(total - tq, total, device=q.device)[:, None]
    p = torch.softmax(s.masked_fill(future, -math.inf), -1)
    return torch.einsum("bhgtl,bhld->bhgtd", p, v).reshape(b, hq, tq, d)
