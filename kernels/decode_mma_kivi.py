"""GQA decode attention over a 2-bit KIVI cache with both tensor-core operands made in registers (Gluon, sm_80+):
``decode_mma``'s program with KIVI's statistics. ``decode_attention_kivi`` runs it for 2-bit GQA at head dim 128
(``decode_attention.KIVI_MMA``; H200 results in ``docs/results/kernels-decode-attention.md``, session 12).

KIVI stores codes as ``int`` does (channels in order, 4 a byte), so the key operand is ``decode_mma._keys``. Its
statistics differ:

* **keys**: a scale and zero per channel and 32-token group. Each warp's 32 tokens are one group (tiles start at
  multiples of 32), so each warp makes its own query operand ``q' = (q / 2^e) s_g`` (fp16) and score offset
  ``sum(q z_g) - 1024 sum(q')`` once a tile (one MMA chain into the same accumulator), so the key operand keeps its
  1024 (``x = 1024 + 2^e c``) and needs no subtraction: ``q . k = mma + offset``.
* **values**: a scale and zero per token and 32-channel group, which cannot be folded into the probabilities of an
  MMA whose columns span groups. So the value operand takes another channel order (``kivi_value_map``): thread lane
  ``g`` holds byte ``g + 8 m`` of each of its tokens' rows, so its channels span the 4 groups ``m`` on registers, and
  each group is one ``[BN x 32]`` operand with its own ``p' = p s_m`` (fp16). Its ``sum(p')`` and ``sum(p z_m)``
  per row are MMAs too, against a column of ones and of the zeros (and the keys' ``sum(q z_g)``), so no row
  reduction crosses lanes in the loop.

The fp16 sink and residual split is the ``tl.dot`` kivi program's (``SEG_ONLY``). ``kivi_mma_reference`` is the
algebra in PyTorch, checked against ``reference.decode_attention_ref`` on the CPU.

Public: ``kivi_mma_supported(q, cache)``, ``kivi_split(q, cache, lens)``, ``launch_kivi_mma(...)``,
``kivi_mma_reference(q, cache, sm_scale)``, ``kivi_value_map``, ``kivi_compiled_counts(...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import decode_mma as _mma
from .decode_mma import gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .decode_mma import (
        _in_split,
        _keys,
        _mma_layout,
        _online,
        _program,
        _query,
        _score_tokens,
        _store_ml,
        _tile_offsets,
        _warp_bases,
        _words_layout,
    )

#: tokens a warp: one key group
KIVI_BLOCK = 32


def kivi_value_map(n: Tensor) -> tuple[Tensor, Tensor]:
    """-> (channel, shift ``e``) of value operand columns ``n`` (0..127): ``n = g + 8 j + 32 m`` is code ``j`` of
    byte ``g + 8 m`` of a row, channel ``32 m + 16 (g >> 2) + 4 (g & 3) + j`` (value group ``m``), ``e = 2 j``."""
    g, j, m = n & 7, (n >> 3) & 3, n >> 5
    return 32 * m + 16 * (g >> 2) + 4 * (g & 3) + j, 2 * j


def kivi_maps(device) -> Tensor:
    """int32 ``(4, 128)``: key channel, key shift (``decode_mma.key_map``, 2 bits), value channel, value shift
    (``kivi_value_map``)."""
    return _mma.operand_maps(2, device, kivi_value_map)


def kivi_mma_supported(q: Tensor, cache) -> bool:
    """A CUDA GPU of compute capability 8.0+, Gluon, a 2-bit KIVI cache of head dim 128 with 32-token key groups
    and 32-channel value groups, whole key groups packed and room for a tile, 2 to 16 query heads a KV head."""
    return (_mma.gluon_ready(q) and cache.bits == 2 and cache.head_dim == 128 and cache.group == KIVI_BLOCK
            and 1 < _mma.query_groups(q, cache) <= 16 and cache.v_scale.shape[-1] == 4
            and cache.k_packed.shape[2] >= _mma.WARPS * KIVI_BLOCK and cache.n_packed % KIVI_BLOCK == 0)


def kivi_mma_reference(q: Tensor, cache, sm_scale: float | None = None) -> Tensor:
    """The program's algebra in PyTorch over the packed tokens only: the operands made from the stored codes in the
    order of ``kivi_maps``, the per-group query operands and offsets, the per-group value operands and corrections
    -> ``(B, H*G, 128)`` float32."""
    b, h, _, _ = cache.k_packed.shape
    n = cache.n_packed
    g = q.shape[1] // h
    scale = (1.0 / 128 ** 0.5 if sm_scale is None else sm_scale)
    kw, vw = [x[:, :, :n].contiguous().view(torch.int32).to(torch.int64) for x in (cache.k_packed, cache.v_packed)]
    kch, ke, vch, ve = kivi_maps(q.device).long()
    kop = 1024.0 + _mma.operand_codes(kw, kch, 2).float() * (1 << ke).float()  # (B, H, n, 128) in operand order
    grp = torch.arange(n, device=q.device) // KIVI_BLOCK
    ks = cache.k_scale[:, :, grp][..., kch].float()  # (B, H, n, 128): each token's group statistics
    kz = cache.k_zero[:, :, grp][..., kch].float()
    qs = (q.float() * scale).view(b, h, g, 1, 128)[..., kch]
    qp = ((qs / (1 << ke).float()).half() * ks.half()[:, :, None]).float()  # (B, H, G, n, 128): per group
    scores = (qp * kop[:, :, None]).sum(-1) - 1024 * qp.sum(-1) + (qs.half().float() * kz[:, :, None]).sum(-1)
    p = torch.softmax(scores, -1)  # (B, H, G, n)
    vop = 1024.0 + _mma.operand_codes(vw, vch, 2).float() * (1 << ve).float()
    m = torch.arange(128, device=q.device) >> 5  # the value group of each operand column
    vs = cache.v_scale[:, :, :n].float()[..., m]  # (B, H, n, 128)
    vz = cache.v_zero[:, :, :n].float()[..., m]
    p16 = p.half()
    pf = (p16[..., None] * vs.half()[:, :, None]).float()  # (B, H, G, n, 128): fp16 p' of each column's group
    acc = (pf * vop[:, :, None]).sum(-2)
    out_n = (acc - 1024 * pf.sum(-2)) / (1 << ve).float() + (p16.float()[..., None] * vz[:, :, None]).sum(-2)
    return _mma.value_channels(out_n, vch)


if gluon is not None:
    @gluon.constexpr_function
    def _bytes_layout(w, bn):
        """Value bytes ``(W, BN, 32)``: lane ``g`` (bits 2..4) holds bytes ``g + 8 m`` (m on registers) of tokens
        ``2 t, 2 t + 1`` (t: lane bits 0, 1) and + 8, + 16."""
        regs = [[0, 0, 8], [0, 0, 16], [0, 1, 0]] + [[0, 8 << e, 0] for e in range(bn.bit_length() - 4)]
        lanes = [[0, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]]
        return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=_warp_bases(w),
                                          block_bases=[], shape=[w, bn, 32])

    @gluon.constexpr_function
    def _byte_pair_asm(j):
        return (f"{{.reg .b32 t; prmt.b32 t, $2, $3, 0x4400; lop3.b32 t, t, {0x00030003 << (2 * j)}, 0x64006400, "
                "0xea; mov.b32 {$0, $1}, t;}")

    @gluon.jit
    def _byte_pair(a, b, J: gl.constexpr):
        """Code ``J`` of bytes ``a`` and ``b`` (int32) -> fp16 ``1024 + 4^J c`` of both, joined."""
        lo, hi = gl.inline_asm_elementwise(_byte_pair_asm(J), "=h,=h,r,r", [a, b], dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _group_values(x, W: gl.constexpr, BN: gl.constexpr, vb: gl.constexpr):
        """Bytes ``(W, BN, 8)`` (lane g: byte ``g + 8 m`` of one group m) -> the B operand ``(W, BN, 32)``, column
        ``g + 8 j``."""
        a, b = gl.split(gl.permute(gl.reshape(x.to(gl.int32), [W, BN // 2, 2, 8]), (0, 1, 3, 2)))
        y = gl.join(gl.join(_byte_pair(a, b, 0), _byte_pair(a, b, 1)), gl.join(_byte_pair(a, b, 2),
                                                                               _byte_pair(a, b, 3)))
        y = gl.reshape(y, [W, BN // 2, 2, 2, 2, 2, 2, 2])  # [W, tp, g2, g1, g0, pair, j0, j1]
        y = gl.permute(y, (0, 1, 5, 7, 6, 2, 3, 4))  # [W, tp, pair, j1, j0, g2, g1, g0]
        return gl.convert_layout(gl.reshape(y, [W, BN, 32]), vb)

    @gluon.constexpr_function
    def _channels_layout(w):
        """A warp's 128 key statistics in channel order ``(W, 128)``: a thread 32 adjacent channels (4 16-byte
        loads), lanes 0-1 the 4 blocks of 32; the bit permutation of ``decode_mma.key_map`` (2 bits) takes it to the
        query operand's ``SliceLayout(1, qa)`` with no data movement (``_key_stats``)."""
        return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]],
                                          lane_bases=[[0, 32], [0, 64], [0, 0], [0, 0], [0, 0]],
                                          warp_bases=[[1 << i, 0] for i in range(w.bit_length() - 1)],
                                          block_bases=[], shape=[w, 128])

    @gluon.jit
    def _key_stats(X, W: gl.constexpr, qk_l: gl.constexpr):
        """A warp's key statistics ``X + (W, 128)`` read in channel order, returned in key-operand order
        ``k = c3 + 2 c5 + 4 c6 + 8 c4 + 16 (c0 + 2 c1 + 4 c2)`` (channel bits c0..c6) in ``qk_l``."""
        cl: gl.constexpr = _channels_layout(W)
        off = (gl.arange(0, W, layout=gl.SliceLayout(1, cl))[:, None] * 128 +
               gl.arange(0, 128, layout=gl.SliceLayout(0, cl))[None, :])
        x = gl.reshape(gl.load(X + off), [W, 2, 2, 2, 2, 2, 2, 2])  # [W, c6, c5, c4, c3, c2, c1, c0]
        x = gl.permute(x, (0, 5, 6, 7, 3, 1, 2, 4))  # [W, c2, c1, c0, c4, c6, c5, c3]: k's bits, high first
        return gl.convert_layout(gl.reshape(x, [W, 128]), qk_l)

    @gluon.constexpr_function
    def _stats_layout(w, bn):
        """Value statistics ``(W, BN, 4 groups)``: a token's 4 on one thread's registers (one 8-byte load), tokens
        as in the score layout (``SliceLayout(1, m3)``: column pairs, + 8, + 16 on registers, lanes 0-1)."""
        regs = [[0, 0, 1], [0, 0, 2], [0, 1, 0]] + [[0, 8 << e, 0] for e in range(bn.bit_length() - 4)]
        lanes = [[0, 2, 0], [0, 4, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
        return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=_warp_bases(w),
                                          block_bases=[], shape=[w, bn, 4])

    @gluon.jit
    def _groups4(x, rows_n: gl.constexpr):
        """``(W, BN, 4)`` fp16 statistics -> the 4 groups' ``(W, BN)`` in layout ``rows_n``."""
        e, o = gl.split(gl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))  # group 2 m1 + m0: split m0, then m1
        g0, g2 = gl.split(e)
        g1, g3 = gl.split(o)
        return (gl.convert_layout(g0, rows_n), gl.convert_layout(g1, rows_n), gl.convert_layout(g2, rows_n),
                gl.convert_layout(g3, rows_n))

    @gluon.jit
    def _wide(x8, W: gl.constexpr, m3: gl.constexpr):
        """An MMA result ``(W, 16, 8)`` whose columns are equal -> the same rows over ``(W, 16, 32)``."""
        x = gl.join(x8, x8)
        x = gl.permute(gl.join(x, x), (0, 1, 4, 3, 2))  # [W, 16, b, a, 8]: column 8 (2 b + a) + n
        return gl.convert_layout(gl.reshape(x, [W, 16, 32]), m3)

    @gluon.jit
    def _group_step(p16, vop, vs, vz, ones, alpha, acc, u, z, qa: gl.constexpr, kb: gl.constexpr):
        """One value group's update. ``p' = p s`` (fp16) into the value MMA; ``sum(p')`` and ``sum(p z)`` per row as
        MMAs too, against a column of ones and of the group's zeros (``(W, 16, 8)``, all columns equal)."""
        pf = gl.convert_layout(p16 * vs[:, None, :], qa)
        acc = mma_v2(pf, vop, acc * alpha[:, :, None])
        u = mma_v2(pf, ones, u * alpha[:, :, None])
        vzb = gl.convert_layout(gl.convert_layout(vz, gl.SliceLayout(2, kb))[:, :, None] + ones * 0.0, kb)
        z = mma_v2(gl.convert_layout(p16, qa), vzb, z * alpha[:, :, None])
        return acc, u, z

    @gluon.jit
    def _group_out(AP, prow, oh, G: gl.constexpr, MAPS, M: gl.constexpr, acc, u, z, sc, W: gl.constexpr,
                   m3: gl.constexpr):
        """Write value group ``M``'s channels of the split's unnormalized output."""
        nn = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
        och = gl.load(MAPS + 256 + 32 * M + nn)
        vf = (1 << gl.load(MAPS + 384 + 32 * M + nn)).to(gl.float32)
        o = gl.sum((acc - 1024.0 * _wide(u, W, m3)) * sc[:, :, None], 0) / vf[None, :]
        o = o + gl.sum(_wide(z, W, m3) * sc[:, :, None], 0)
        gl.store(AP + prow[:, None] * 128 + och[None, :], o, mask=(oh < G)[:, None])

    @gluon.jit
    def kivi_mma_kernel(Q, sqb, sqh, KW, KS, KZ, VB, VS, VZ, MAPS, MP, LP, AP, H, Tmax, NG, n_packed,
                        tokens_per_split, NSP, qk_scale, LENS, G: gl.constexpr, W: gl.constexpr, DYN: gl.constexpr):
        """Program ``(b * H + h, sp)`` over split ``sp`` of the packed tokens (``decode_mma.int_mma_kernel``'s plan
        and outputs) of a 2-bit KIVI cache: ``KW`` the key codes as int32 words, ``VB`` the value codes as bytes,
        ``KS, KZ (B*H, NG, 128)``, ``VS, VZ (B*H, Tmax, 4)``, ``MAPS`` the ``kivi_maps``."""
        BN: gl.constexpr = 32
        pid, sp, b, h, start, end = _program(H, LENS, n_packed, tokens_per_split, NSP, W * BN, DYN)
        m3: gl.constexpr = _mma_layout(W)
        qa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
        kb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
        rows: gl.constexpr = gl.SliceLayout(2, m3)
        kwl: gl.constexpr = _words_layout(W, BN, True, 2)
        vbl: gl.constexpr = _bytes_layout(W, BN)
        qk_l: gl.constexpr = gl.SliceLayout(1, qa)  # (W, 128): a warp's per-channel key statistics
        # the query rows (zero past G), scaled, in key-operand order, divided by the shifts (fp32) and as fp16
        qs, qf = _query(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa)
        qsf = (qs / qf[None, None, :]).to(gl.float16)  # times a warp's key scales: its query operand
        q16 = qs.to(gl.float16)
        # tile offsets: key words, value bytes, statistics in the score layout, key statistics of each warp
        koff = _tile_offsets(W, BN, 8, 2, kwl)
        voff = _tile_offsets(W, BN, 32, 1, vbl)
        ct = _score_tokens(W, BN, m3)
        rows_n: gl.constexpr = gl.SliceLayout(1, m3)  # (W, BN): per-token values in the score layout
        gsl: gl.constexpr = _stats_layout(W, BN)
        goff = _tile_offsets(W, BN, 4, 1, gsl)
        gct = goff // 4  # their tokens
        row = pid.to(gl.int64) * Tmax
        grow = pid.to(gl.int64) * NG
        # tiles start at or before it, so every read is inside the buffers; a multiple of 32, so that each warp's
        # tokens stay one key group when the last tile is moved back (the packed tokens are whole groups)
        last = Tmax // BN * BN - W * BN
        m_i = gl.full([W, 16], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([W, 16], gl.float32, rows)
        u0 = gl.zeros([W, 16, 8], gl.float32, m3)  # sum(p') and sum(p z) of each group: equal columns
        u1 = gl.zeros([W, 16, 8], gl.float32, m3)
        u2 = gl.zeros([W, 16, 8], gl.float32, m3)
        u3 = gl.zeros([W, 16, 8], gl.float32, m3)
        z0 = gl.zeros([W, 16, 8], gl.float32, m3)
        z1 = gl.zeros([W, 16, 8], gl.float32, m3)
        z2 = gl.zeros([W, 16, 8], gl.float32, m3)
        z3 = gl.zeros([W, 16, 8], gl.float32, m3)
        ones = gl.full([W, BN, 8], 1.0, gl.float16, kb)
        m1024 = gl.full([W, 128, 8], -1024.0, gl.float16, kb)
        a0 = gl.zeros([W, 16, 32], gl.float32, m3)
        a1 = gl.zeros([W, 16, 32], gl.float32, m3)
        a2 = gl.zeros([W, 16, 32], gl.float32, m3)
        a3 = gl.zeros([W, 16, 32], gl.float32, m3)
        for t0 in range(start, end, W * BN):
            t0c = gl.minimum(t0, last)
            base = row + t0c
            kw = gl.load(KW + base * 8 + koff)
            vb8 = gl.load(VB + base * 32 + voff)
            ks = _key_stats(KS + (grow + t0c // BN) * 128, W, qk_l)  # (W, 128) fp16: the warps' groups
            kz = _key_stats(KZ + (grow + t0c // BN) * 128, W, qk_l)
            valid = _in_split(ct, t0, t0c, end)
            # scores: each warp's query operand and offset for its group
            qp = qsf * ks[:, None, :]
            kzb = gl.convert_layout(gl.convert_layout(kz, gl.SliceLayout(2, kb))[:, :, None] +
                                    gl.zeros([W, 128, 8], gl.float16, kb), kb)
            # sum(q z) - 1024 sum(q'), every column: the key operand keeps its 1024
            off = _wide(mma_v2(qp, m1024, mma_v2(q16, kzb, gl.zeros([W, 16, 8], gl.float32, m3))), W, m3)
            s = mma_v2(qp, _keys(kw, W, BN, 2, kb), off)
            s = gl.where(valid[:, None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online(s, m_i, l_i)
            # values: one operand, scale and zero per 32-channel group
            x = gl.reshape(gl.permute(gl.reshape(vb8, [W, BN, 4, 8]), (0, 1, 3, 2)), [W, BN, 8, 2, 2])
            xe, xo = gl.split(x)  # byte groups m = 2 m1 + 0, 2 m1 + 1: [W, BN, 8, 2 (m1)]
            x0, x2 = gl.split(xe)
            x1, x3 = gl.split(xo)
            gvalid = _in_split(gct, t0, t0c, end)
            vs0, vs1, vs2, vs3 = _groups4(gl.load(VS + base * 4 + goff, mask=gvalid, other=0.0), rows_n)
            vz0, vz1, vz2, vz3 = _groups4(gl.load(VZ + base * 4 + goff, mask=gvalid, other=0.0), rows_n)
            p16 = p.to(gl.float16)
            a0, u0, z0 = _group_step(p16, _group_values(x0, W, BN, kb), vs0, vz0, ones, alpha, a0, u0,
                                     z0, qa, kb)
            a1, u1, z1 = _group_step(p16, _group_values(x1, W, BN, kb), vs1, vz1, ones, alpha, a1, u1,
                                     z1, qa, kb)
            a2, u2, z2 = _group_step(p16, _group_values(x2, W, BN, kb), vs2, vz2, ones, alpha, a2, u2,
                                     z2, qa, kb)
            a3, u3, z3 = _group_step(p16, _group_values(x3, W, BN, kb), vs3, vz3, ones, alpha, a3, u3,
                                     z3, qa, kb)
        sc = _store_ml(MP, LP, b, h, H, NSP, sp, m_i, l_i, G, rows)
        oh = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
        prow = (b.to(gl.int64) * H * G + h * G + oh) * NSP + sp
        _group_out(AP, prow, oh, G, MAPS, 0, a0, u0, z0, sc, W, m3)
        _group_out(AP, prow, oh, G, MAPS, 1, a1, u1, z1, sc, W, m3)
        _group_out(AP, prow, oh, G, MAPS, 2, a2, u2, z2, sc, W, m3)
        _group_out(AP, prow, oh, G, MAPS, 3, a3, u3, z3, sc, W, m3)


def kivi_compiled_counts(g: int = 4, dyn: bool = True, warps: int = 2, sass: bool = False) -> dict:
    """As ``decode_mma.compiled_counts``, for this program."""
    from .decode_mma import _compile_counts

    sig = dict(Q="*fp16", KW="*i32", KS="*fp16", KZ="*fp16", VB="*u8", VS="*fp16", VZ="*fp16", MAPS="*i32",
               MP="*fp32", LP="*fp32", AP="*fp32", qk_scale="fp32", LENS="*i32")
    aligned = ("Q", "sqb", "sqh", "KW", "KS", "KZ", "VB", "VS", "VZ", "MAPS", "MP", "LP", "AP", "Tmax",
               "tokens_per_split")
    return _compile_counts(kivi_mma_kernel, sig, dict(G=g, W=warps, DYN=dyn), aligned, warps, sass)


def _kivi_consts(q: Tensor, cache, lens: Tensor | None) -> dict:
    """The program's constants for a launch on ``q, cache``."""
    return dict(G=_mma.query_groups(q, cache), W=_mma.WARPS, DYN=lens is not None)


def _kivi_args(q: Tensor, cache, mp, lp, ap, per: int, nsp: int, scale: float, lens: Tensor | None) -> tuple:
    """The program's arguments for one launch."""
    return (q, q.stride(0), q.stride(1), cache.k_packed.view(torch.int32), cache.k_scale, cache.k_zero,
            cache.v_packed, cache.v_scale, cache.v_zero, kivi_maps(q.device), mp, lp, ap, cache.k_packed.shape[1],
            cache.k_packed.shape[2], cache.k_scale.shape[2], cache.n_packed, per, nsp, scale,
            q if lens is None else lens)


def kivi_split(q: Tensor, cache, lens: Tensor | None) -> tuple[int, int]:
    """(tokens a tile, programs an SM) of this program on ``q, cache`` (``decode_mma.program_split``)."""
    f32 = torch.float32
    return _mma.program_split(kivi_mma_kernel, _kivi_consts(q, cache, lens), q.device,
                              lambda: _kivi_args(q, cache, f32, f32, f32, _mma.WARPS * KIVI_BLOCK, 2, 1.0, lens),
                              KIVI_BLOCK)


def launch_kivi_mma(q: Tensor, cache, mp: Tensor, lp: Tensor, ap: Tensor, per: int, nsp: int, scale: float,
                    lens: Tensor | None) -> None:
    """Splits ``0 .. nsp - 2`` of ``decode_attention_kivi``'s plan (``per`` a multiple of ``decode_mma.WARPS * 32``,
    the warps read at call time as the plan does) into the partial buffers, as ``decode_mma.launch_mma``."""
    if nsp < 2:
        return
    _mma.remember("kivi", kivi_mma_kernel[(cache.k_packed.shape[0] * cache.k_packed.shape[1], nsp - 1)](
        *_kivi_args(q, cache, mp, lp, ap, per, nsp, scale, lens), **_kivi_consts(q, cache, lens),
        **_mma.launch_options()))


__all__ = ["KIVI_BLOCK", "kivi_mma_supported", "launch_kivi_mma", "kivi_mma_reference", "kivi_value_map",
           "kivi_maps", "kivi_compiled_counts", "kivi_split"]
