"""GQA decode attention over a 2- or 4-bit KVQuant cache with both tensor-core operands made in registers (Gluon,
sm_80+): ``decode_mma``'s program with KVQuant's codebooks and pre-RoPE keys. ``decode_attention_kvquant`` runs it
for GQA at head dim 128 (``decode_attention.KVQ_MMA``; H200 results in ``docs/results/kernels-decode-attention.md``).

The cache is read as it is stored (``KVQuantCache``: channels in order, codes LSB first).

* **Codebook lookups by shuffle.** Lane ``l`` of a warp holds one entry of a 32-entry table of fp16 pairs
  (``lane_table``); ``shfl.idx`` with the codes as the lane index returns the codebook values, and only the low 5
  bits of the index count, so no mask is needed. 2 bits: the table is indexed by two codes at once (entry
  ``(c[l & 3], c[l >> 2 & 3])``), one shuffle per two channels; 4 bits: one shuffle per code.
* **Keys** (B operand, ``k`` = channel, ``n`` = token; ``kvq_key_map``). Each thread holds the two halves of a
  rotation pair (channels ``c`` and ``c + 64``) for the same token, as fp16 pairs ``(c, c + 1)``. The pre-RoPE
  key is ``ka + ksc * cb[code]`` (fp16 ``fma``), then rotated in registers by the token's angle *within its warp's
  32 tokens* (``(n_sink + d + n) theta``, a 64-row table that stays in L1; ``d`` is the warp's offset past a multiple
  of 32, nonzero only in a last tile moved back to end at the capacity); the rest of the angle is taken off the query
  once a tile (``q . R(a + b) k = (R(a)^T q) . (R(b) k)``), from a table with one row per 32 tokens.
* **Values** (B operand, ``k`` = token, ``n`` = channel; ``decode_mma.value_map`` order): the codebook value
  ``cv[code]`` of two tokens per register, by shuffle; ``v = (v_min + v_scale / 2) + (v_scale / 2) cv`` is folded as
  ``p' = p v_scale / 2`` into the MMA and ``sum(p (v_min + v_scale / 2))`` per row.
* **Outliers**: as the ``tl.dot`` program (``decode_outliers``): the scores add ``DS`` (``SPK``) and are stored to
  ``SS`` for the value outliers' pass (``SPV``).

One program: a (batch, KV head) row's ``G <= 16`` query heads (the MMA rows) over one split of the packed tokens,
in tiles of ``W`` warps by 32 tokens (``decode_mma``'s split plan, outputs and fp16-segment split). There is no CPU
interpreter for Gluon: the CPU tests compile it for sm_90 and check the maps, tables and algebra with
``kvq_mma_reference``; the GPU tests run it.

Public: ``kvq_mma_supported(q, cache)``, ``kvq_tile()``, ``kvq_split(q, cache, lens)``, ``launch_kvq_mma(...)``,
``kvq_mma_reference(q, cache, sm_scale)``, ``kvq_key_map``, ``lane_table``, ``rope_tables``,
``kvq_compiled_counts(...)``.
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
        _arrange_values,
        _in_split,
        _mma_layout,
        _online,
        _program,
        _query_rows,
        _score_tokens,
        _store_ml,
        _tile_offsets,
        _token_pairs,
        _words_layout,
    )

#: tokens a warp (the in-warp rotation table's rows)
KVQ_BLOCK = 32
#: 2-bit values (kvquant's and nf's programs): the two tokens' codes interleaved into nibbles, then one shift and one
#: shuffle a lookup (``_code_nibbles``; 2 instructions a lookup against 5). On: H200, 128K / 1M, same run (session 15,
#: ``bench/bench_mma.py``): kvq2 154 -> 148 / 833 -> 780 µs, nf2 77 -> 73 / 463 -> 422 µs, kvq2-1% unchanged
VALUE_NIBBLES = True


def kvq_tile() -> int:
    """Tokens a tile (the split plan's block): ``decode_mma.WARPS * KVQ_BLOCK``."""
    return _mma.WARPS * KVQ_BLOCK


def kvq_key_map(k: Tensor) -> Tensor:
    """Channel of key operand rows ``k`` (0..127): ``k = e + 2 t + 8 hh + 16 kl + 64 kh`` is channel
    ``64 kh + 16 t + 4 kl + 2 hh + e``: lane ``t`` holds channels ``16 t ..`` of both halves, so each rotation pair
    ``(c, c + 64)`` sits in one thread (rows ``k`` and ``k + 64``)."""
    e, t, hh, kl, kh = k & 1, (k >> 1) & 3, (k >> 3) & 1, (k >> 4) & 3, k >> 6
    return 64 * kh + 16 * t + 4 * kl + 2 * hh + e


def kvq_maps(bits_v: int, device) -> Tensor:
    """int32 ``(2, 128)``: key operand channels (``kvq_key_map``), value operand channels (``decode_mma.value_map``)."""
    return _mma.channel_maps(("kvquant", bits_v), device, lambda i: [kvq_key_map(i), _mma.value_map(i, bits_v)[0]])


def lane_table(cb: Tensor, bits: int) -> Tensor:
    """int32 ``(32,)``: lane ``l``'s fp16 pair (low half first) of the shuffle lookup of codebook ``cb``. 2 bits:
    ``(cb[l & 3], cb[l >> 2 & 3])`` (two codes an index); 4 bits: ``(cb[l & 15], cb[l & 15])``."""
    lane = torch.arange(32, device=cb.device)
    c16 = cb.to(torch.float16)
    lo, hi = (c16[lane & 3], c16[(lane >> 2) & 3]) if bits == 2 else (c16[lane & 15], c16[lane & 15])
    return torch.stack([lo, hi], -1).contiguous().view(torch.int32).reshape(32)


def rope_tables(invf: Tensor, n_sink: int, rows: int, block: int = KVQ_BLOCK) -> tuple[Tensor, Tensor]:
    """fp16 tables of the program's two rotations (angles in float64, then rounded):

    * ``qt (2, R >= rows, 128)``: row ``r`` is ``[cos, cos]`` and ``[sin, -sin]`` of ``r * block * invf``, the
      query's rotation back by the start of a warp's tokens (channel ``c`` and ``c + 64`` share ``invf[c % 64]``);
    * ``kt (2, 2 block, 64)``: row ``n`` is cos and sin of ``(n_sink + n) * invf``, each key's rotation inside its
      warp's tokens (rows ``d ..`` when the warp starts ``d`` tokens past a multiple of ``block``: the last tile of a
      capacity that is no multiple of ``block``)."""
    r = torch.arange(rows, dtype=torch.float64, device=invf.device)[:, None] * block * invf.double()[None, :]
    c, s = r.cos(), r.sin()
    qt = torch.stack([torch.cat([c, c], -1), torch.cat([s, -s], -1)]).half().contiguous()
    a = (n_sink + torch.arange(2 * block, dtype=torch.float64, device=invf.device))[:, None] * invf.double()[None, :]
    return qt, torch.stack([a.cos(), a.sin()]).half().contiguous()


def _operands(q: Tensor, cache) -> tuple:
    """(ka, ksc as fp16 ``(H, 128)``, key and value lane tables, qt, kt) for a launch (made once per source)."""
    from .decode_attention import _cached, _frequencies, key_affine

    ka, ksc = key_affine(cache)
    invf = _frequencies(cache, q.device)
    rows = (cache.k_packed.shape[2] + KVQ_BLOCK - 1) // KVQ_BLOCK + 1
    aff = _cached(("aff", id(ka), id(ksc)), (ka, ksc), lambda: (ka.half().contiguous(), ksc.half().contiguous()))
    luts = _cached(("lut", id(cache.ck), id(cache.cv), cache.bits_k, cache.bits_v), (cache.ck, cache.cv),
                   lambda: (lane_table(cache.ck, cache.bits_k), lane_table(cache.cv, cache.bits_v)))
    tabs = _cached(("rope", id(invf), cache.n_sink, rows), (invf,), lambda: rope_tables(invf, cache.n_sink, rows))
    return (*aff, *luts, *tabs)


def kvq_mma_supported(q: Tensor, cache) -> bool:
    """A CUDA GPU of compute capability 8.0+, Gluon, a KVQuant cache of 2- or 4-bit keys and values at head dim 128
    with room for a tile, 2 to 16 query heads a KV head."""
    return (_mma.gluon_ready(q) and cache.bits_k in (2, 4) and cache.bits_v in (2, 4) and cache.head_dim == 128
            and 1 < _mma.query_groups(q, cache) <= 16 and cache.k_packed.shape[2] >= kvq_tile())


# ----------------------------------------------------------------------------------------------- PyTorch mirror
def kvq_mma_reference(q: Tensor, cache, sm_scale: float | None = None) -> Tensor:
    """The program's algebra in PyTorch over the packed tokens only (no fp16 segments, no outliers): keys in
    ``kvq_key_map`` order dequantized in fp16 and rotated by their angle inside their 32-token block (``rope_tables``'s
    ``kt``), the query rotated back by the block's start (``qt``), values in ``value_map`` order with ``p' = p s``
    -> ``(B, H*G, 128)`` float32. Against the reference it checks the maps, tables and corrections."""
    from .decode_attention import _frequencies, key_affine

    b, h, _, _ = cache.k_packed.shape
    n, s0 = cache.n_packed, cache.n_sink
    g = q.shape[1] // h
    scale = (1.0 / 128 ** 0.5 if sm_scale is None else sm_scale)
    kch, vch = kvq_maps(cache.bits_v, q.device).long()
    kw, vw = [x[:, :, :n].contiguous().view(torch.int32).to(torch.int64) for x in (cache.k_packed, cache.v_packed)]
    kc = _mma.operand_codes(kw, kch, cache.bits_k)  # (B, H, n, 128) in operand order
    ka, ksc = [x.half()[None, :, None, kch] for x in key_affine(cache)]  # (1, H, 1, 128)
    k = (ka + ksc * cache.ck.half()[kc]).float()  # pre-RoPE, fp16 as the program makes it
    qt, kt = rope_tables(_frequencies(cache, q.device), s0, (n + KVQ_BLOCK - 1) // KVQ_BLOCK + 1)
    # tiles as the program reads them: from multiples of 32, the last moved back to end at the capacity
    tmax = cache.k_packed.shape[2]
    i = torch.arange(n, device=q.device)
    tile = kvq_tile()
    t0 = (i // tile * tile).clamp(max=tmax - tile)
    blk, j = (i - t0) // KVQ_BLOCK + t0 // KVQ_BLOCK, (i - t0) % KVQ_BLOCK + t0 % KVQ_BLOCK
    half = kch % 64
    kc_, ks_ = kt[0][j][:, half].float(), kt[1][j][:, half].float()  # (n, 128)
    sign = torch.where(kch < 64, -1.0, 1.0).to(q.device)
    partner = (torch.arange(128, device=q.device) + 64) % 128  # operand row of the rotation partner
    kr = k * kc_ + k[..., partner] * ks_ * sign  # R(n_sink + j) k
    qs = (q.float() * scale).half().float().view(b, h, g, 128)[..., kch]
    qc, qsn = qt[0][blk][:, kch % 128].float(), qt[1][blk][:, kch % 128].float()  # (n, 128): [cos, cos], [s, -s]
    qr = qs[:, :, :, None, :] * qc + qs[..., partner][:, :, :, None, :] * qsn  # (B, H, G, n, 128): R(32 blk)^T q
    scores = (qr * kr[:, :, None]).sum(-1)
    p = torch.softmax(scores, -1)
    vc = _mma.operand_codes(vw, vch, cache.bits_v)
    hs = cache.v_scale[:, :, :n].float() / 2
    zv = cache.v_min[:, :, :n].float() + hs
    pf = (p * hs[:, :, None]).half().float()
    out_n = torch.einsum("bhgn,bhnc->bhgc", pf, cache.cv.half().float()[vc]) + (p * zv[:, :, None]).sum(-1)[..., None]
    return _mma.value_channels(out_n, vch)


# ----------------------------------------------------------------------------------------------- Gluon program
if gluon is not None:
    @gluon.constexpr_function
    def _half_words_layout(w, bn, bits, slots):
        """Key words of one half of a row ``(W, NP, BN, slots)`` (``NP = 2 bits`` words; ``slots`` > 1: an
        inner axis of per-pair table entries, contiguous): lane ``t`` (bits 0, 1) holds words ``t`` (2 bits) or
        ``2 t, 2 t + 1`` (4 bits) of token ``g`` (lane bits 2..4) and + 8, + 16, + 24."""
        own = bits // 2  # log2 of the words of 16 channels
        n = 3 if slots == 1 else 4

        def at(axis, v):
            return [v if a == axis else 0 for a in range(n)]

        regs = [at(3, 1 << e) for e in range(slots.bit_length() - 1)]
        regs += [at(1, 1 << e) for e in range(own - 1)] + [at(2, 8 << e) for e in range(bn.bit_length() - 4)]
        lanes = [at(1, 1 << (own - 1)), at(1, 2 << (own - 1)), at(2, 1), at(2, 2), at(2, 4)]
        return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes,
                                          warp_bases=[at(0, 1 << i) for i in range(w.bit_length() - 1)],
                                          block_bases=[], shape=[w, 2 * bits, bn] + ([] if slots == 1 else [slots]))

    @gluon.constexpr_function
    def _key_asm(shift, bits, rot=True):
        """Key pair slot: words ``$4`` (low half) and ``$5`` (high half) shifted by ``shift``, looked up in lane
        table ``$6`` into ``fl, fh``; ``rot``: dequantized (``$7 + $8 x``, ``$9 + $10 x``: ka, ksc of each half) and
        rotated by ``$11`` (cos) and ``$12`` (sin) -> fp16 pairs ``{$0, $1}`` (low half) and ``{$2, $3}`` (high
        half)."""
        sh = "" if shift == 0 else f"shr.b32 i, $4, {shift}; shr.b32 j, $5, {shift}; "
        li, lj = ("$4", "$5") if shift == 0 else ("i", "j")
        if bits == 2:
            look = (f"shfl.sync.idx.b32 fl, $6, {li}, 0x1f, 0xffffffff; "
                    f"shfl.sync.idx.b32 fh, $6, {lj}, 0x1f, 0xffffffff; ")
        else:
            look = (f"shr.b32 u, $4, {shift + 4}; shr.b32 v, $5, {shift + 4}; "
                    f"shfl.sync.idx.b32 fl, $6, {li}, 0x1f, 0xffffffff; shfl.sync.idx.b32 u, $6, u, 0x1f, 0xffffffff; "
                    f"shfl.sync.idx.b32 fh, $6, {lj}, 0x1f, 0xffffffff; shfl.sync.idx.b32 v, $6, v, 0x1f, 0xffffffff; "
                    "prmt.b32 fl, fl, u, 0x5410; prmt.b32 fh, fh, v, 0x5410; ")
        if not rot:
            return "{.reg .b32 i, j, u, v, fl, fh; " + sh + look + "mov.b32 {$0, $1}, fl; mov.b32 {$2, $3}, fh;}"
        return ("{.reg .b32 i, j, u, v, fl, fh, kl, kh, t; " + sh + look +
                "fma.rn.f16x2 kl, fl, $8, $7; fma.rn.f16x2 kh, fh, $10, $9; "
                "mul.rn.f16x2 t, kh, $12; neg.f16x2 t, t; fma.rn.f16x2 i, kl, $11, t; "
                "mul.rn.f16x2 t, kl, $12; fma.rn.f16x2 j, kh, $11, t; "
                "mov.b32 {$0, $1}, i; mov.b32 {$2, $3}, j;}")

    @gluon.jit
    def _key_slot(lo, hi, tab, kal, ksl, kah, ksh, c, s, SHIFT: gl.constexpr, BITS: gl.constexpr, L: gl.constexpr):
        """One pair slot of words ``lo, hi (W, NP, BN)`` (layout ``L``) with each half's ka, ksc ``(W, NP)`` (fp16
        pairs as int32) and the slot's rotation ``c, s (W, NP, BN)`` -> fp16 on minor axes ``[e, kh]``."""
        S2: gl.constexpr = gl.SliceLayout(2, L)
        kal = gl.convert_layout(kal, S2)[:, :, None]
        ksl = gl.convert_layout(ksl, S2)[:, :, None]
        kah = gl.convert_layout(kah, S2)[:, :, None]
        ksh = gl.convert_layout(ksh, S2)[:, :, None]
        a0, a1, b0, b1 = gl.inline_asm_elementwise(
            _key_asm(SHIFT, BITS), "=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
            [lo, hi, tab, kal + lo * 0, ksl + lo * 0, kah + lo * 0, ksh + lo * 0, gl.convert_layout(c, L),
             gl.convert_layout(s, L)],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.join(gl.join(a0, a1), gl.join(b0, b1))

    @gluon.constexpr_function
    def _row_layout(w):
        """A warp's 128 channels ``(W, 2, 4, 16)`` (half ``kh``, lane ``t``, 16 channels on registers, contiguous:
        two 16-byte loads) as ``kvq_key_map`` spreads them over a query operand's threads (lanes 2..4 replicate)."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4], [0, 0, 0, 8], [0, 1, 0, 0]],
            lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
            warp_bases=[[1 << i, 0, 0, 0] for i in range(w.bit_length() - 1)], block_bases=[], shape=[w, 2, 4, 16])

    @gluon.jit
    def _operand_row(x, W: gl.constexpr, layout: gl.constexpr):
        """``(W, 2, 4, 16)`` in channel order (``_row_layout``) -> ``(W, 128)`` in key-operand order in ``layout``."""
        x = gl.reshape(x, [W, 2, 2, 2, 2, 2, 2, 2])  # [W, kh, t1, t0, kl1, kl0, hh, e]
        x = gl.permute(x, (0, 1, 4, 5, 6, 2, 3, 7))  # [W, kh, kl1, kl0, hh, t1, t0, e]
        return gl.convert_layout(gl.reshape(x, [W, 128]), layout)

    @gluon.jit
    def _rotate(q, qp, c, s):
        """``q c + qp s`` in fp16 pairs (``mul`` and ``fma`` of ``f16x2``)."""
        return gl.inline_asm_elementwise("{.reg .b32 t; mul.rn.f16x2 t, $3, $4; fma.rn.f16x2 $0, $1, $2, t;}",
                                         "=r,r,r,r,r", [q, c, qp, s], dtype=gl.float16, is_pure=True, pack=2)

    @gluon.jit
    def _split8(x):
        """``x (..., 2, 2, 2)`` (slot ``m`` = 4 i2 + 2 i1 + i0 on the last three axes) -> its 8 slots."""
        a, b = gl.split(x)
        a0, a1 = gl.split(a)
        b0, b1 = gl.split(b)
        x0, x4 = gl.split(a0)
        x2, x6 = gl.split(a1)
        x1, x5 = gl.split(b0)
        x3, x7 = gl.split(b1)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @gluon.jit
    def _split4(x):
        """``x (..., 2, 2)`` -> its 4 slots."""
        a, b = gl.split(x)
        x0, x2 = gl.split(a)
        x1, x3 = gl.split(b)
        return x0, x1, x2, x3

    @gluon.jit
    def _keys_kvq(lo, hi, tab, kal, ksl, kah, ksh, cs, sn, W: gl.constexpr, BN: gl.constexpr, BITS: gl.constexpr,
                  kb: gl.constexpr, L: gl.constexpr):
        """Half-row words ``lo, hi (W, NP, BN)``, lane table ``tab`` (same shape), each half's ka, ksc
        ``(W, NP, SW)`` and the in-warp rotation ``cs, sn (W, NP, BN, SW)`` (``SW = 16 / BITS`` pair slots a word,
        fp16 pairs as int32) -> the B operand ``(W, 128, BN)`` fp16 in ``kvq_key_map`` order."""
        NP: gl.constexpr = 2 * BITS
        if BITS == 2:  # slot m: bits 4 m.. of word t; m = hh + 2 kl
            a0, a1, a2, a3, a4, a5, a6, a7 = _split8(gl.reshape(kal, [W, NP, 2, 2, 2]))
            s0, s1, s2, s3, s4, s5, s6, s7 = _split8(gl.reshape(ksl, [W, NP, 2, 2, 2]))
            h0, h1, h2, h3, h4, h5, h6, h7 = _split8(gl.reshape(kah, [W, NP, 2, 2, 2]))
            g0, g1, g2, g3, g4, g5, g6, g7 = _split8(gl.reshape(ksh, [W, NP, 2, 2, 2]))
            c0, c1, c2, c3, c4, c5, c6, c7 = _split8(gl.reshape(cs, [W, NP, BN, 2, 2, 2]))
            n0, n1, n2, n3, n4, n5, n6, n7 = _split8(gl.reshape(sn, [W, NP, BN, 2, 2, 2]))
            x = gl.join(gl.join(gl.join(_key_slot(lo, hi, tab, a0, s0, h0, g0, c0, n0, 0, 2, L),
                                        _key_slot(lo, hi, tab, a1, s1, h1, g1, c1, n1, 4, 2, L)),
                                gl.join(_key_slot(lo, hi, tab, a2, s2, h2, g2, c2, n2, 8, 2, L),
                                        _key_slot(lo, hi, tab, a3, s3, h3, g3, c3, n3, 12, 2, L))),
                        gl.join(gl.join(_key_slot(lo, hi, tab, a4, s4, h4, g4, c4, n4, 16, 2, L),
                                        _key_slot(lo, hi, tab, a5, s5, h5, g5, c5, n5, 20, 2, L)),
                                gl.join(_key_slot(lo, hi, tab, a6, s6, h6, g6, c6, n6, 24, 2, L),
                                        _key_slot(lo, hi, tab, a7, s7, h7, g7, c7, n7, 28, 2, L))))
        else:  # word 2 t + u, byte b (slot b; both nibbles): hh = b0, kl0 = b1, kl1 = u
            a0, a1, a2, a3 = _split4(gl.reshape(kal, [W, NP, 2, 2]))
            s0, s1, s2, s3 = _split4(gl.reshape(ksl, [W, NP, 2, 2]))
            h0, h1, h2, h3 = _split4(gl.reshape(kah, [W, NP, 2, 2]))
            g0, g1, g2, g3 = _split4(gl.reshape(ksh, [W, NP, 2, 2]))
            c0, c1, c2, c3 = _split4(gl.reshape(cs, [W, NP, BN, 2, 2]))
            n0, n1, n2, n3 = _split4(gl.reshape(sn, [W, NP, BN, 2, 2]))
            x = gl.join(gl.join(_key_slot(lo, hi, tab, a0, s0, h0, g0, c0, n0, 0, 4, L),
                                _key_slot(lo, hi, tab, a1, s1, h1, g1, c1, n1, 8, 4, L)),
                        gl.join(_key_slot(lo, hi, tab, a2, s2, h2, g2, c2, n2, 16, 4, L),
                                _key_slot(lo, hi, tab, a3, s3, h3, g3, c3, n3, 24, 4, L)))
        return _arrange_keys(x, W, BN, BITS, kb)

    @gluon.jit
    def _arrange_keys(x, W: gl.constexpr, BN: gl.constexpr, BITS: gl.constexpr, kb: gl.constexpr):
        """The slots' fp16 ``(W, NP, BN, e, kh, slot bits...)`` -> the B operand ``(W, 128, BN)`` in ``kvq_key_map``
        order. 2 bits: slot ``m = hh + 2 kl`` of word ``t``; 4 bits: byte ``b`` of word ``2 t + u`` (``hh = b0``,
        ``kl0 = b1``, ``kl1 = u``)."""
        if BITS == 2:
            x = gl.reshape(x, [W, 2, 2, BN, 2, 2, 2, 2, 2])  # [W, t1, t0, n, e, kh, hh, kl0, kl1]
            x = gl.permute(x, (0, 5, 8, 7, 6, 1, 2, 4, 3))  # [W, kh, kl1, kl0, hh, t1, t0, e, n]
        else:
            x = gl.reshape(x, [W, 2, 2, 2, BN, 2, 2, 2, 2])  # [W, t1, t0, u, n, e, kh, hh, kl0]
            x = gl.permute(x, (0, 6, 3, 8, 7, 1, 2, 5, 4))  # [W, kh, kl1, kl0, hh, t1, t0, e, n]
        return gl.convert_layout(gl.reshape(x, [W, 128, BN]), kb)

    @gluon.jit
    def _lut_slot(lo, hi, tab, SHIFT: gl.constexpr, BITS: gl.constexpr):
        """One pair slot of words ``lo, hi (W, NP, BN)`` looked up (no dequantization, no rotation) -> fp16 on minor
        axes ``[e, kh]``."""
        a0, a1, b0, b1 = gl.inline_asm_elementwise(
            _key_asm(SHIFT, BITS, False), "=h,=h,=h,=h,r,r,r", [lo, hi, tab],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.join(gl.join(a0, a1), gl.join(b0, b1))

    @gluon.jit
    def _keys_lut(lo, hi, tab, W: gl.constexpr, BN: gl.constexpr, BITS: gl.constexpr, kb: gl.constexpr):
        """Half-row words ``lo, hi (W, NP, BN)`` and lane table ``tab`` -> the B operand ``(W, 128, BN)`` of table
        values in ``kvq_key_map`` order (``_keys_kvq`` without its dequantization and rotation)."""
        if BITS == 2:
            x = gl.join(gl.join(gl.join(_lut_slot(lo, hi, tab, 0, 2), _lut_slot(lo, hi, tab, 4, 2)),
                                gl.join(_lut_slot(lo, hi, tab, 8, 2), _lut_slot(lo, hi, tab, 12, 2))),
                        gl.join(gl.join(_lut_slot(lo, hi, tab, 16, 2), _lut_slot(lo, hi, tab, 20, 2)),
                                gl.join(_lut_slot(lo, hi, tab, 24, 2), _lut_slot(lo, hi, tab, 28, 2))))
        else:
            x = gl.join(gl.join(_lut_slot(lo, hi, tab, 0, 4), _lut_slot(lo, hi, tab, 8, 4)),
                        gl.join(_lut_slot(lo, hi, tab, 16, 4), _lut_slot(lo, hi, tab, 24, 4)))
        return _arrange_keys(x, W, BN, BITS, kb)

    @gluon.constexpr_function
    def _vlut_asm(x, j, bits):
        """Code ``j`` of byte ``x`` of token words ``$2`` and ``$3`` looked up in lane table ``$4`` -> fp16 ``$0``
        (token of ``$2``) and ``$1``."""
        sel = x | ((4 + x) << 4) | (x << 8) | ((4 + x) << 12)  # byte 0: a's byte x, byte 1: b's
        if bits == 2:  # index: a's code at bits 0-1, b's at bits 2-3 (bit 4 not read: the table repeats)
            body = (f"shr.b32 i, t, {2 * j}; shr.b32 u, t, {2 * j + 6}; lop3.b32 i, i, u, 3, 0xe4; "
                    "shfl.sync.idx.b32 t, $4, i, 0x1f, 0xffffffff; ")
        else:
            body = (f"shr.b32 i, t, {4 * j}; shr.b32 u, t, {4 * j + 8}; shfl.sync.idx.b32 i, $4, i, 0x1f, 0xffffffff; "
                    "shfl.sync.idx.b32 u, $4, u, 0x1f, 0xffffffff; prmt.b32 t, i, u, 0x5410; ")
        return "{.reg .b32 t, i, u; " + f"prmt.b32 t, $2, $3, {sel}; " + body + "mov.b32 {$0, $1}, t;}"

    @gluon.jit
    def _code_nibbles(a, b):
        """2-bit words ``a, b`` of two tokens -> ``(e, o)``: nibble ``m`` of ``e`` is ``a``'s code ``2 m`` then
        ``b``'s (bits 0-1, 2-3), of ``o`` their codes ``2 m + 1``: each nibble is a lane-table index as it stands, so a
        lookup is one shift and one shuffle (``VALUE_NIBBLES``)."""
        return gl.inline_asm_elementwise(_nibbles_asm(), "=r,=r,r,r", [a, b], dtype=(gl.int32, gl.int32),
                                         is_pure=True, pack=1)

    @gluon.constexpr_function
    def _nibbles_asm():
        """2-bit words ``$2`` (token a) and ``$3`` (token b) -> ``$0``: nibble ``m`` is a's code ``2 m`` (bits 0-1)
        and b's (bits 2-3); ``$1``: their codes ``2 m + 1`` (lop3 ``0xe4``: ``(x & c) | (y & ~c)``)."""
        return ("{.reg .b32 u, v; shl.b32 u, $3, 2; lop3.b32 $0, $2, u, 0x33333333, 0xe4; "
                "shr.b32 v, $2, 2; lop3.b32 $1, v, $3, 0x33333333, 0xe4;}")

    @gluon.constexpr_function
    def _nib_asm(shift):
        """Lane-table lookup of the nibble at bit ``shift`` of ``$2`` (an index as it stands: ``shfl`` reads the
        low 5 bits, and a 2-bit table repeats over bit 4) in table ``$3`` -> the entry's fp16 halves ``$0, $1``."""
        sh, i = ("", "$2") if shift == 0 else (f"shr.b32 i, $2, {shift}; ", "i")
        return "{.reg .b32 i, t; " + sh + f"shfl.sync.idx.b32 t, $3, {i}, 0x1f, 0xffffffff; mov.b32 {{$0, $1}}, t;}}"

    @gluon.jit
    def _vlut_nib(e, o, tab, X: gl.constexpr, J: gl.constexpr):
        """``_vlut(a, b, tab, X, J, 2)`` from ``_code_nibbles(a, b)``: code ``4 X + J`` is nibble ``2 X + J // 2``
        of ``e`` (``J`` even) or ``o``."""
        src = e if J % 2 == 0 else o
        lo, hi = gl.inline_asm_elementwise(_nib_asm(4 * (2 * X + J // 2)), "=h,=h,r,r", [src, tab],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _vlut_byte_nib(e, o, tab, X: gl.constexpr):
        return gl.join(gl.join(_vlut_nib(e, o, tab, X, 0), _vlut_nib(e, o, tab, X, 1)),
                       gl.join(_vlut_nib(e, o, tab, X, 2), _vlut_nib(e, o, tab, X, 3)))

    @gluon.jit
    def _vlut(a, b, tab, X: gl.constexpr, J: gl.constexpr, BITS: gl.constexpr):
        lo, hi = gl.inline_asm_elementwise(_vlut_asm(X, J, BITS), "=h,=h,r,r,r", [a, b, tab],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _vlut_byte(a, b, tab, X: gl.constexpr, BITS: gl.constexpr):
        if BITS == 2:
            return gl.join(gl.join(_vlut(a, b, tab, X, 0, 2), _vlut(a, b, tab, X, 1, 2)),
                           gl.join(_vlut(a, b, tab, X, 2, 2), _vlut(a, b, tab, X, 3, 2)))
        else:
            return gl.join(_vlut(a, b, tab, X, 0, 4), _vlut(a, b, tab, X, 1, 4))

    @gluon.jit
    def _values_kvq(vw, tab, W: gl.constexpr, BN: gl.constexpr, BITS: gl.constexpr, vb: gl.constexpr,
                    NIB: gl.constexpr = False):
        """V words ``(W, BN, NW)`` and lane table ``tab`` (same shape) -> the B operand ``(W, BN, 128)`` of codebook
        values, columns in ``value_map`` order (``decode_mma._values`` with lookups for the bit tricks). ``NIB``
        (2 bits): the two tokens' codes interleaved into nibbles first (``_code_nibbles``), then a shift and a
        shuffle a lookup, instead of a byte permute, two shifts, a merge and a shuffle."""
        a, b = _token_pairs(vw, W, BN, 4 * BITS)
        ta, _ = _token_pairs(tab, W, BN, 4 * BITS)  # (both tokens' lanes hold the same entry)
        if NIB and BITS == 2:
            e, o = _code_nibbles(a, b)
            y = gl.join(gl.join(_vlut_byte_nib(e, o, ta, 0), _vlut_byte_nib(e, o, ta, 1)),
                        gl.join(_vlut_byte_nib(e, o, ta, 2), _vlut_byte_nib(e, o, ta, 3)))
        else:
            y = gl.join(gl.join(_vlut_byte(a, b, ta, 0, BITS), _vlut_byte(a, b, ta, 1, BITS)),
                        gl.join(_vlut_byte(a, b, ta, 2, BITS), _vlut_byte(a, b, ta, 3, BITS)))
        return gl.convert_layout(_arrange_values(y, W, BN, BITS), vb)

    @gluon.jit
    def _qtable_offsets(W: gl.constexpr):
        """Offsets ``(W, 2, 4, 16)`` in ``_row_layout`` of a warp's row of the query rotation table (row ``w`` of
        the tile: ``+ 128 w``)."""
        qtl: gl.constexpr = _row_layout(W)
        return (gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, qtl))))[:, None, None,
                                                                                                     None] * 128 +
                gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, qtl))))[None, :, None,
                                                                                                     None] * 64 +
                gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, qtl))))[None, None, :,
                                                                                                     None] * 16 +
                gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, qtl))))[None, None,
                                                                                                      None, :])

    @gluon.jit
    def _ktable_offsets(W: gl.constexpr, BN: gl.constexpr, NP: gl.constexpr, SW: gl.constexpr, hws: gl.constexpr):
        """Offsets ``(W, NP, BN, SW)`` in ``hws`` of the key rotation table's pair entries: row ``n`` (32 pairs a
        row), pair ``SW word + slot``."""
        ctw = gl.arange(0, NP, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, hws))))
        ctn = gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, hws))))
        cts = gl.arange(0, SW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, hws))))
        ctww = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, hws))))
        return ((ctww[:, None, None] * 0 + ctn[None, None, :] * 32 + ctw[None, :, None] * SW)[:, :, :, None] +
                cts[None, None, None, :])

    @gluon.jit
    def _query16(Q, sqb, sqh, b, h, MAPS, qk_scale, G: gl.constexpr, W: gl.constexpr, qa: gl.constexpr):
        """``decode_mma._query_rows`` in ``kvq_key_map`` order (``kvq_maps``), as fp16: the key MMA's A operand."""
        return _query_rows(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa).to(gl.float16)

    @gluon.jit
    def _half_offsets(W: gl.constexpr, BN: gl.constexpr, NW: gl.constexpr, hw: gl.constexpr):
        """Offsets ``(W, NP, BN)`` in ``hw`` (``_half_words_layout``) of the low half-row words of a tile's tokens,
        rows of ``NW`` words (the high half: ``+ NW / 2``)."""
        kwn = gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, hw)))
        kww = gl.arange(0, NW // 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, hw)))
        kwv = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, hw)))
        return (kwv[:, None, None] * BN + kwn[None, None, :]) * NW + kww[None, :, None]

    @gluon.jit
    def _lane_tables(KT, VT, W: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BV: gl.constexpr,
                     hw: gl.constexpr, vwl: gl.constexpr):
        """Each thread's own lane entry of the key table ``KT`` over the key half words ``(W, NP, BN)`` and of the
        value table ``VT`` over the value words ``(W, BN, NWV)`` (``lane_table``)."""
        return (gl.load(KT + _lane_ids(W, 2 * BK, BN, hw, BK // 4, 3, 0, 7)),
                gl.load(VT + _lane_ids(W, BN, 4 * BV, vwl, 1, 3, BV // 2 - 1, 7)))

    @gluon.jit
    def _lane_ids(W: gl.constexpr, A: gl.constexpr, B: gl.constexpr, layout: gl.constexpr, SA: gl.constexpr,
                  MA: gl.constexpr, SB: gl.constexpr, MB: gl.constexpr):
        """``(W, A, B)`` in ``layout``: ``((i >> SA) & MA) + ((j >> SB) & MB) * (MA + 1)`` of axes 1 and 2, the lane
        that holds each element (so a load at it gives every thread its own lane's table entry)."""
        i = gl.arange(0, A, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
        j = gl.arange(0, B, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
        w = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
        return (w[:, None, None] * 0 + ((i[None, :, None] >> SA) & MA) +
                ((j[None, None, :] >> SB) & MB) * (MA + 1))

    @gluon.jit
    def kvq_mma_kernel(Q, sqb, sqh, KW, VW, VMIN, VSC, KA, KSC, CKT, CVT, QT, tab_rows, KT, MAPS, MP, LP, AP, DS,
                       SS, SST, H, Tmax, n_packed, tokens_per_split, NSP, qk_scale, LENS, G: gl.constexpr,
                       BK: gl.constexpr, BV: gl.constexpr, W: gl.constexpr, DYN: gl.constexpr,
                       SPK: gl.constexpr, SPV: gl.constexpr, NIB: gl.constexpr = False):
        """Program ``(b * H + h, sp)`` over split ``sp`` of the packed tokens (``decode_mma.int_mma_kernel``'s plan
        and outputs) of a KVQuant cache: ``KW, VW`` the codes as int32 words, ``VMIN, VSC (B*H, Tmax)``, ``KA, KSC
        (H, 64)`` fp16 pairs as int32, ``CKT, CVT`` the lane tables, ``QT (2, tab_rows, 128)`` fp16 and ``KT (2, 64,
        32)`` fp16 pairs as int32 the rotations (``rope_tables``), ``MAPS`` the ``kvq_maps``; ``DS`` / ``SS`` the
        outliers' score rows of ``SST``."""
        BN: gl.constexpr = 32
        NWK: gl.constexpr = 4 * BK  # words a key row
        NWV: gl.constexpr = 4 * BV
        NP: gl.constexpr = 2 * BK  # words a half row
        SW: gl.constexpr = 16 // BK  # pair slots a word
        pid, sp, b, h, start, end = _program(H, LENS, n_packed, tokens_per_split, NSP, W * BN, DYN)
        m3: gl.constexpr = _mma_layout(W)
        qa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
        kb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
        rows: gl.constexpr = gl.SliceLayout(2, m3)
        hw: gl.constexpr = _half_words_layout(W, BN, BK, 1)
        hws: gl.constexpr = _half_words_layout(W, BN, BK, SW)
        vwl: gl.constexpr = _words_layout(W, BN, False, BV)
        qk_l: gl.constexpr = gl.SliceLayout(1, qa)  # (W, 128): per-channel values of the query operand
        # the query rows (zero past G), scaled, fp16, in key-operand order; its partner rows (k +- 64)
        q16 = _query16(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa)
        x = gl.split(gl.permute(gl.reshape(q16, [W, 16, 2, 64]), (0, 1, 3, 2)))  # (k < 64, k >= 64)
        q16p = gl.convert_layout(gl.reshape(gl.permute(gl.join(x[1], x[0]), (0, 1, 3, 2)), [W, 16, 128]), qa)
        # the query's rotation back by each warp's first token: table row (t0 + 32 w) / 32
        qtoff = _qtable_offsets(W)
        # keys: each half's ka, ksc (loop-invariant), the in-warp rotation table, the lane table
        kaw = gl.arange(0, NP, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(2, hws))))
        kas = gl.arange(0, SW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, hws))))
        kaww = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(2, hws))))
        kaoff = kaww[:, None, None] * 0 + kaw[None, :, None] * SW + kas[None, None, :]  # pair index (W, NP, SW)
        KA32 = KA + h * 64
        KS32 = KSC + h * 64
        kal = gl.load(KA32 + kaoff)
        kah = gl.load(KA32 + 32 + kaoff)
        ksl = gl.load(KS32 + kaoff)
        ksh = gl.load(KS32 + 32 + kaoff)
        ctoff = _ktable_offsets(W, BN, NP, SW, hws)
        ktab, vtab = _lane_tables(CKT, CVT, W, BN, BK, BV, hw, vwl)
        # word offsets: key half rows (W, NP, BN), value rows, statistics in the score layout
        koff = _half_offsets(W, BN, NWK, hw)
        voff = _tile_offsets(W, BN, NWV, 1, vwl)
        ct = _score_tokens(W, BN, m3)
        row = pid.to(gl.int64) * Tmax
        # tiles start at or before it, so every read is inside the buffers; a warp's tokens start d = t0c % 32 past
        # a multiple of 32 (the query table's rows), 0 but in the last tile, and its keys read the table from row d
        last = Tmax - W * BN
        srow = gl.arange(0, 16, layout=gl.SliceLayout(0, rows))
        soff = (b.to(gl.int64) * H * G + h * G + srow)[None, :, None] * SST  # + token
        smask = (srow < G)[None, :, None]
        m_i = gl.full([W, 16], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([W, 16], gl.float32, rows)
        z_i = gl.zeros([W, 16], gl.float32, rows)
        acc = gl.zeros([W, 16, 128], gl.float32, m3)
        n_tiles = gl.cdiv(end - start, W * BN)
        for it in range(0, n_tiles):
            t0 = start + it * (W * BN)
            t0c = gl.minimum(t0, last)
            base = row + t0c
            lo = gl.load(KW + base * NWK + koff)
            hi = gl.load(KW + base * NWK + NP + koff)
            vw = gl.load(VW + base * NWV + voff)
            vmin = gl.load(VMIN + base + ct)
            vsc = gl.load(VSC + base + ct)
            qc = _operand_row(gl.load(QT + (t0c // BN) * 128 + qtoff), W, qk_l)
            qs = _operand_row(gl.load(QT + (tab_rows + t0c // BN) * 128 + qtoff), W, qk_l)
            valid = _in_split(ct, t0, t0c, end)
            if SPK:  # the key outliers' score corrections, loaded with the codes: the key product's start
                sidx = soff + (t0c + ct)[:, None, :]
                sm = smask & valid[:, None, :]
                s0 = gl.load(DS + sidx, mask=sm, other=0.0)
            else:
                s0 = gl.zeros([W, 16, BN], gl.float32, m3)
            # the query rotated back by each warp's first token (fp16), the keys by their place in the warp
            qc, _ = gl.broadcast(qc[:, None, :], q16)
            qs, _ = gl.broadcast(qs[:, None, :], q16)
            qr = _rotate(q16, q16p, qc, qs)
            cs = gl.load(KT + (t0c % BN) * 32 + ctoff)
            sn = gl.load(KT + 64 * BN + (t0c % BN) * 32 + ctoff)
            kop = _keys_kvq(lo, hi, ktab, kal, ksl, kah, ksh, cs, sn, W, BN, BK, kb, hw)
            s = mma_v2(qr, kop, s0)
            if SPV:
                if not SPK:
                    sidx = soff + (t0c + ct)[:, None, :]
                    sm = smask & valid[:, None, :]
                gl.store(SS + sidx, s, mask=sm)
            s = gl.where(valid[:, None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online(s, m_i, l_i)
            hs = gl.where(valid, vsc.to(gl.float32) * 0.5, 0.0)
            zv = gl.where(valid, vmin.to(gl.float32) + hs, 0.0)
            z_i = z_i * alpha + gl.sum(p * zv[:, None, :], 2)
            pf = (p * hs[:, None, :]).to(gl.float16)
            acc = mma_v2(gl.convert_layout(pf, qa), _values_kvq(vw, vtab, W, BN, BV, kb, NIB),
                         acc * alpha[:, :, None])
        sc = _store_ml(MP, LP, b, h, H, NSP, sp, m_i, l_i, G, rows)
        nn = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
        och = gl.load(MAPS + 128 + nn)
        o = gl.sum(acc * sc[:, :, None], 0)
        o = o + gl.convert_layout(gl.sum(z_i * sc, 0), gl.SliceLayout(1, gl.SliceLayout(0, m3)))[:, None]
        oh = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
        prow = (b.to(gl.int64) * H * G + h * G + oh) * NSP + sp
        gl.store(AP + prow[:, None] * 128 + och[None, :], o, mask=(oh < G)[:, None])


def kvq_compiled_counts(g: int = 4, dyn: bool = True, bk: int = 2, bv: int = 2, spk: bool = False,
                        spv: bool = False, warps: int = 2, sass: bool = False, nib: bool | None = None) -> dict:
    """As ``decode_mma.compiled_counts``, for this program (``nib``: ``VALUE_NIBBLES`` when None)."""
    from .decode_mma import _compile_counts

    sig = dict(Q="*fp16", KW="*i32", VW="*i32", VMIN="*fp16", VSC="*fp16", KA="*i32", KSC="*i32", CKT="*i32",
               CVT="*i32", QT="*fp16", KT="*i32", MAPS="*i32", MP="*fp32", LP="*fp32", AP="*fp32", DS="*fp32",
               SS="*fp32", qk_scale="fp32", LENS="*i32")
    aligned = ("Q", "sqb", "sqh", "KW", "VW", "VMIN", "VSC", "KA", "KSC", "CKT", "CVT", "QT", "KT", "MAPS", "MP",
               "LP", "AP", "DS", "SS", "Tmax", "tokens_per_split")
    consts = dict(G=g, BK=bk, BV=bv, W=warps, DYN=dyn, SPK=spk, SPV=spv, NIB=VALUE_NIBBLES if nib is None else nib)
    return _compile_counts(kvq_mma_kernel, sig, consts, aligned, warps, sass)


def _kvq_consts(q: Tensor, cache, lens: Tensor | None, spk: bool, spv: bool) -> dict:
    """The program's constants for a launch on ``q, cache``."""
    return dict(G=_mma.query_groups(q, cache), BK=cache.bits_k, BV=cache.bits_v, W=_mma.WARPS,
                DYN=lens is not None, SPK=spk, SPV=spv, NIB=VALUE_NIBBLES)


def _kvq_args(q: Tensor, cache, mp, lp, ap, per: int, nsp: int, scale: float, lens: Tensor | None, ds, ss,
              sst: int) -> tuple:
    """The program's arguments for one launch (``ds``, ``ss``: the outliers' score rows, or None)."""
    ka, ksc, ckt, cvt, qt, kt = _operands(q, cache)
    return (q, q.stride(0), q.stride(1), cache.k_packed.view(torch.int32), cache.v_packed.view(torch.int32),
            cache.v_min, cache.v_scale, ka.view(torch.int32), ksc.view(torch.int32), ckt, cvt, qt, qt.shape[1],
            kt.view(torch.int32), kvq_maps(cache.bits_v, q.device), mp, lp, ap,
            mp if ds is None else ds, mp if ss is None else ss, sst, cache.k_packed.shape[1], cache.k_packed.shape[2],
            cache.n_packed, per, nsp, scale, q if lens is None else lens)


def kvq_split(q: Tensor, cache, lens: Tensor | None, spk: bool = False, spv: bool = False) -> tuple[int, int]:
    """(tokens a tile, programs an SM) of this program on ``q, cache`` (``decode_mma.program_split``)."""
    f32 = torch.float32
    return _mma.program_split(kvq_mma_kernel, _kvq_consts(q, cache, lens, spk, spv), q.device,
                              lambda: _kvq_args(q, cache, f32, f32, f32, kvq_tile(), 2, 1.0, lens, None, None, 1),
                              KVQ_BLOCK)


def launch_kvq_mma(q: Tensor, cache, mp: Tensor, lp: Tensor, ap: Tensor, per: int, nsp: int, scale: float,
                   lens: Tensor | None, ds: Tensor | None = None, ss: Tensor | None = None, sst: int = 1) -> None:
    """Splits ``0 .. nsp - 2`` of ``decode_attention_kvquant``'s plan (``per`` a multiple of ``WARPS * 32``) into
    the partial buffers, as ``decode_mma.launch_mma``; ``ds`` adds the key outliers' score corrections, ``ss``
    receives the scores for the value outliers' pass (rows of ``sst``)."""
    if nsp < 2:
        return
    _mma.remember("kvquant", kvq_mma_kernel[(cache.k_packed.shape[0] * cache.k_packed.shape[1], nsp - 1)](
        *_kvq_args(q, cache, mp, lp, ap, per, nsp, scale, lens, ds, ss, sst),
        **_kvq_consts(q, cache, lens, ds is not None, ss is not None), **_mma.launch_options()))


__all__ = ["KVQ_BLOCK", "kvq_tile", "kvq_mma_supported", "launch_kvq_mma", "kvq_mma_reference", "kvq_key_map",
           "kvq_maps", "lane_table", "rope_tables", "kvq_compiled_counts", "kvq_split", "VALUE_NIBBLES"]
