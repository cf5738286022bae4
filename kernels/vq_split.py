"""Split-K building blocks shared by the ``cq`` and ``pq`` decode kernels (``cq_decode``, ``pq_decode``).

A program owns one KV head ``h`` of one sequence ``b`` and its ``G`` query heads (padded to ``GP``, a power of
two), so every K/V read serves all of them; it walks one chunk of the packed tokens (or, the last split, the
fp16 sink and residual), keeps an online softmax in the log2 domain (scores pre-scaled by
``sm_scale * log2(e)``) and stores its running max / sum / unnormalized output as ``decode_attention``'s reduce
kernel expects: ``m, l (B*H*G, NSP)`` and ``acc (B*H*G, NSP, D)`` float32, row ``b*H*G + h*G + g``. The
merge is ``decode_attention._finish`` (imported, not copied).

Shapes inside a program: query halves ``q1, q2 (GP, D/2)``, key/value halves ``(BLOCK_N, D/2)``, scores
``(GP, BLOCK_N)``, accumulators ``(GP, D/2)``. Halves: RoPE's rotate_half pairs channel i with i + D/2.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

# LOG2E and check_query are re-exported for the cq/pq wrappers
from .decode_attention import LOG2E, _finish, check_query, split_plan  # noqa: F401
from .decode_split import _load_query as _load_rows
from .decode_split import _store_partial as _store_rows

#: split programs per SM the default plan aims for
PROGRAMS_PER_SM = 4


@triton.jit
def _load_query(Q, sqb, sqh, b, h, qk_scale, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """Query heads ``h*G .. h*G+G-1`` of sequence b (zero rows up to GP), scaled: halves ``(GP, D/2)``."""
    return _load_rows(Q, sqb, sqh, b, h * G, qk_scale, G, GP, D)


@triton.jit
def _scores(q1, q2, k1, k2):
    """``q (GP, D/2)`` halves x ``k (N, D/2)`` halves -> ``(GP, N)``."""
    return tl.sum(q1[:, None, :] * k1[None, :, :], axis=2) + tl.sum(q2[:, None, :] * k2[None, :, :], axis=2)


@triton.jit
def _rotate_query(q1, q2, INVF, p0, HALF: tl.constexpr):
    """``R(p0)^T q`` (HF rotate_half), so that ``q . R(p0 + j) k = (R(p0)^T q) . (R(j) k)``."""
    ang = tl.load(INVF + tl.arange(0, HALF)) * p0
    c0 = tl.cos(ang)[None, :]
    s0 = tl.sin(ang)[None, :]
    return q1 * c0 + q2 * s0, q2 * c0 - q1 * s0


@triton.jit
def _online(s, v1, v2, m, l, acc1, acc2):
    """Online-softmax update with log2-domain scores ``s (GP, N)`` (masked entries -inf)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * v1[None, :, :], axis=1)
    acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * v2[None, :, :], axis=1)
    return m_new, l, acc1, acc2


@triton.jit
def _fp16_segment(q1, q2, K, V, base, n, pos0, cj, sj, INVF, m, l, acc1, acc2,
                  ROPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attend over ``n`` fp16 tokens at ``K/V + base`` (rows of D); with ``ROPE`` the keys are pre-RoPE at
    positions ``pos0 + i`` (``cj, sj (BLOCK_N, D/2)``: cos/sin of ``j * inv_freq``)."""
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
            s = _scores(qr1, qr2, k1 * cj - k2 * sj, k2 * cj + k1 * sj)
        else:  # q made loop-variant (+ 0 * t0): works around a Triton 3.6 layout-pass bug (GQA, two loops)
            s = _scores(q1 + 0.0 * t0, q2 + 0.0 * t0, k1, k2)
        s = tl.where(valid[None, :], s, -float("inf"))
        m, l, acc1, acc2 = _online(s, v1, v2, m, l, acc1, acc2)
    return m, l, acc1, acc2


@triton.jit
def _store_partial(MP, LP, AP, pid_bh, sp, NSP, m, l, acc1, acc2, G: tl.constexpr, GP: tl.constexpr,
                   D: tl.constexpr):
    """Partials of the program's query heads: rows ``(pid_bh * G + g) * NSP + sp`` for ``g < G``."""
    _store_rows(MP, LP, AP, pid_bh.to(tl.int64) * G * NSP + sp, NSP, m, l, acc1, acc2, G, GP, D, True)


def plan(q: Tensor, heads: int, n_packed: int, block_n: int, num_splits: int | None):
    """Split-K plan for one program per (sequence, KV head): ``decode_attention.split_plan``."""
    return split_plan(q, q.shape[0] * heads, n_packed, block_n, num_splits, PROGRAMS_PER_SM)


def reduce(q: Tensor, nsp: int, partials) -> Tensor:
    """Merge the partials into ``(B, H*G, D)`` in q's dtype (``decode_attention``'s reduce kernel)."""
    return _finish(q, nsp, *partials)
