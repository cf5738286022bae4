"""GQA decode attention over a 2- or 4-bit ``nf`` cache (a level table, a scale a token-head, no zero) with both
tensor-core operands made in registers (Gluon, sm_80+): ``decode_mma_kvquant``'s lookups without its rotation.
``decode_token.decode_attention_token`` runs it for GQA at head dim 128 (``decode_token.NF_MMA``, on).

* **Keys** (B operand, ``kvq_key_map`` order): the level table looked up by lane shuffle (``lane_table``), two
  channels a register; the scores are ``s_k (q . L[c])``, the token's scale applied to the MMA's column.
* **Values** (B operand, ``value_map`` order): the levels of two tokens a register (``decode_mma_kvquant``'s value
  operand); ``p' = p s_v`` (fp16) into the MMA, and nothing else: no zero.

One program: a (batch, KV head) row's ``G <= 16`` query heads over one split of the packed tokens, in tiles of ``W``
warps by 32 tokens (``decode_mma``'s plan, outputs and fp16-segment split). ``nf_mma_reference`` is the algebra in
PyTorch, checked against ``token_reference`` on the CPU; the CPU tests compile the program for sm_90, the GPU tests
run it.

Public: ``nf_mma_supported(q, cache)``, ``nf_split(q, cache, lens)``, ``launch_nf_mma(...)``,
``nf_mma_reference(q, cache, sm_scale)``, ``nf_compiled_counts(...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import decode_mma as _mma
from . import decode_mma_kvquant
from .decode_mma import gluon
from .decode_mma_kvquant import KVQ_BLOCK, kvq_maps, kvq_tile, lane_table

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .decode_mma import (
        _in_split,
        _mma_layout,
        _online,
        _program,
        _score_tokens,
        _store_ml,
        _tile_offsets,
        _words_layout,
    )
    from .decode_mma_kvquant import _half_offsets, _half_words_layout, _keys_lut, _lane_tables, _query16, _values_kvq

#: the variants, as (bits, counts read from the device), that load each tile's codes and scales a tile ahead, in
#: flight during the previous tile's math. H200, same run (session 17): nf2 with device counts (the variant
#: ``kvq generate``'s graphs run) 76.9 -> 69.5 µs at 128K, 447.8 -> 403.3 at 1M, 168 registers either way; nf2 with
#: host counts (73 -> 87 µs, 192 registers: a program an SM fewer) and nf4 (198-207 registers) are slower with it
#: (session 16), so they do not
PREFETCH = frozenset({(2, True)})


def _lut(cache) -> Tensor:
    """The lane table of the cache's levels, made once per levels tensor (its identity and version:
    ``decode_attention._cached``)."""
    from .decode_attention import _cached

    lv = cache.levels
    return _cached(("nf-lut", id(lv), cache.bits), (lv,), lambda: lane_table(lv, cache.bits))


def nf_mma_supported(q: Tensor, cache) -> bool:
    """A CUDA GPU of compute capability 8.0+, Gluon, a 2- or 4-bit ``TokenCache`` with a level table and no zero
    points at head dim 128 with room for a tile, 2 to 16 query heads a KV head."""
    return (_mma.gluon_ready(q) and cache.bits in (2, 4) and cache.head_dim == 128 and cache.levels is not None
            and cache.k_zero is None and 1 < _mma.query_groups(q, cache) <= 16
            and cache.k_packed.shape[2] >= kvq_tile())


def nf_mma_reference(q: Tensor, cache, sm_scale: float | None = None) -> Tensor:
    """The program's algebra in PyTorch over the packed tokens only: key and value operands of fp16 levels in the
    order of ``kvq_maps``, the scaled fp16 query, the token scales on the scores and ``p' = p s_v`` in fp16 ->
    ``(B, H*G, 128)`` float32. Against ``token_reference`` it checks the maps and the scales the program uses."""
    b, h = cache.k_packed.shape[:2]
    n, bits = cache.n_packed, cache.bits
    g = q.shape[1] // h
    scale = (1.0 / 128 ** 0.5 if sm_scale is None else sm_scale)
    kch, vch = kvq_maps(bits, q.device).long()
    lv = cache.levels.half().float()
    kw, vw = [x[:, :, :n].contiguous().view(torch.int32).to(torch.int64) for x in (cache.k_packed, cache.v_packed)]
    kop = lv[_mma.operand_codes(kw, kch, bits)]  # (B, H, n, 128) in operand order
    qs = (q.float() * scale).half().float().view(b, h, g, 128)[..., kch]
    s = torch.einsum("bhgk,bhnk->bhgn", qs, kop) * cache.k_scale[:, :, None, :n].float()
    p = torch.softmax(s, -1)
    pf = (p * cache.v_scale[:, :, None, :n].float()).half().float()
    out_n = torch.einsum("bhgn,bhnc->bhgc", pf, lv[_mma.operand_codes(vw, vch, bits)])
    return _mma.value_channels(out_n, vch)


if gluon is not None:
    @gluon.jit
    def _nf_loads(KW, VW, KS, VS, base, koff, voff, ct, NW: gl.constexpr, NP: gl.constexpr):
        """One tile's key half-row words, value words and scales, its first token at row ``base``."""
        return (gl.load(KW + base * NW + koff), gl.load(KW + base * NW + NP + koff), gl.load(VW + base * NW + voff),
                gl.load(KS + base + ct), gl.load(VS + base + ct))

    @gluon.jit
    def nf_mma_kernel(Q, sqb, sqh, KW, KS, VW, VS, LUT, MAPS, MP, LP, AP, H, Tmax, n_packed, tokens_per_split, NSP,
                      qk_scale, LENS, G: gl.constexpr, BITS: gl.constexpr, W: gl.constexpr, DYN: gl.constexpr,
                      NIB: gl.constexpr = False, PF: gl.constexpr = False):
        """Program ``(b * H + h, sp)`` over split ``sp`` of the packed tokens (``decode_mma.int_mma_kernel``'s plan
        and outputs) of an ``nf`` cache: ``KW, VW`` the codes as int32 words, ``KS, VS (B*H, Tmax)`` the scales,
        ``LUT`` the lane table of the levels, ``MAPS`` the ``kvq_maps``; ``PF``: each tile's loads issued a tile
        ahead (``PREFETCH``)."""
        BN: gl.constexpr = 32
        NW: gl.constexpr = 4 * BITS  # words a row
        NP: gl.constexpr = 2 * BITS  # words a half row
        pid, sp, b, h, start, end = _program(H, LENS, n_packed, tokens_per_split, NSP, W * BN, DYN)
        m3: gl.constexpr = _mma_layout(W)
        qa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
        kb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
        rows: gl.constexpr = gl.SliceLayout(2, m3)
        hw: gl.constexpr = _half_words_layout(W, BN, BITS, 1)
        vwl: gl.constexpr = _words_layout(W, BN, False, BITS)
        q16 = _query16(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa)  # the query rows, in key-operand order
        # offsets: key half rows (W, NP, BN), value rows, scales in the score layout; the lane tables
        koff = _half_offsets(W, BN, NW, hw)
        voff = _tile_offsets(W, BN, NW, 1, vwl)
        ktab, vtab = _lane_tables(LUT, LUT, W, BN, BITS, BITS, hw, vwl)
        ct = _score_tokens(W, BN, m3)
        row = pid.to(gl.int64) * Tmax
        last = Tmax - W * BN  # tiles start at or before it, so every read is inside the buffers
        m_i = gl.full([W, 16], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([W, 16], gl.float32, rows)
        acc = gl.zeros([W, 16, 128], gl.float32, m3)
        if PF:
            nxt = _nf_loads(KW, VW, KS, VS, row + gl.minimum(start, last), koff, voff, ct, NW, NP)
        for t0 in range(start, end, W * BN):
            t0c = gl.minimum(t0, last)
            if PF:  # this tile's loads were issued a tile ago; the next tile's go in flight now
                lo, hi, vw, ks, vs = nxt
                nxt = _nf_loads(KW, VW, KS, VS, row + gl.minimum(t0 + W * BN, last), koff, voff, ct, NW, NP)
            else:
                lo, hi, vw, ks, vs = _nf_loads(KW, VW, KS, VS, row + t0c, koff, voff, ct, NW, NP)
            valid = _in_split(ct, t0, t0c, end)
            s = mma_v2(q16, _keys_lut(lo, hi, ktab, W, BN, BITS, kb), gl.zeros([W, 16, BN], gl.float32, m3))
            s = gl.where(valid[:, None, :], s * ks.to(gl.float32)[:, None, :], float("-inf"))
            p, alpha, m_i, l_i = _online(s, m_i, l_i)
            pf = (p * gl.where(valid, vs.to(gl.float32), 0.0)[:, None, :]).to(gl.float16)
            acc = mma_v2(gl.convert_layout(pf, qa), _values_kvq(vw, vtab, W, BN, BITS, kb, NIB),
                         acc * alpha[:, :, None])
        sc = _store_ml(MP, LP, b, h, H, NSP, sp, m_i, l_i, G, rows)
        nn = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
        och = gl.load(MAPS + 128 + nn)
        o = gl.sum(acc * sc[:, :, None], 0)
        oh = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
        prow = (b.to(gl.int64) * H * G + h * G + oh) * NSP + sp
        gl.store(AP + prow[:, None] * 128 + och[None, :], o, mask=(oh < G)[:, None])


def nf_compiled_counts(g: int = 4, dyn: bool = True, bits: int = 4, warps: int = 2, sass: bool = False,
                       nib: bool | None = None, pf: bool | None = None) -> dict:
    """As ``decode_mma.compiled_counts``, for this program (``nib``: ``decode_mma_kvquant.VALUE_NIBBLES`` when
    None; ``pf``: whether ``PREFETCH`` holds the variant when None)."""
    from .decode_mma import _compile_counts

    sig = dict(Q="*fp16", KW="*i32", KS="*fp16", VW="*i32", VS="*fp16", LUT="*i32", MAPS="*i32", MP="*fp32",
               LP="*fp32", AP="*fp32", qk_scale="fp32", LENS="*i32")
    aligned = ("Q", "sqb", "sqh", "KW", "KS", "VW", "VS", "LUT", "MAPS", "MP", "LP", "AP", "Tmax", "tokens_per_split")
    consts = dict(G=g, BITS=bits, W=warps, DYN=dyn, NIB=decode_mma_kvquant.VALUE_NIBBLES if nib is None else nib,
                  PF=(bits, dyn) in PREFETCH if pf is None else pf)
    return _compile_counts(nf_mma_kernel, sig, consts, aligned, warps, sass)


def _nf_consts(q: Tensor, cache, lens: Tensor | None) -> dict:
    return dict(G=_mma.query_groups(q, cache), BITS=cache.bits, W=_mma.WARPS, DYN=lens is not None,
                NIB=decode_mma_kvquant.VALUE_NIBBLES, PF=(cache.bits, lens is not None) in PREFETCH)


def _nf_args(q: Tensor, cache, mp, lp, ap, per: int, nsp: int, scale: float, lens: Tensor | None) -> tuple:
    return (q, q.stride(0), q.stride(1), cache.k_packed.view(torch.int32), cache.k_scale,
            cache.v_packed.view(torch.int32), cache.v_scale, _lut(cache), kvq_maps(cache.bits, q.device), mp, lp, ap,
            cache.k_packed.shape[1], cache.k_packed.shape[2], cache.n_packed, per, nsp, scale,
            q if lens is None else lens)


def nf_split(q: Tensor, cache, lens: Tensor | None) -> tuple[int, int]:
    """(tokens a tile, programs an SM) of this program on ``q, cache`` (``decode_mma.program_split``)."""
    f32 = torch.float32
    return _mma.program_split(nf_mma_kernel, _nf_consts(q, cache, lens), q.device,
                              lambda: _nf_args(q, cache, f32, f32, f32, kvq_tile(), 2, 1.0, lens), KVQ_BLOCK)


def launch_nf_mma(q: Tensor, cache, mp: Tensor, lp: Tensor, ap: Tensor, per: int, nsp: int, scale: float,
                  lens: Tensor | None) -> None:
    """Splits ``0 .. nsp - 2`` of ``decode_token``'s plan into the partial buffers, as ``decode_mma.launch_mma``."""
    if nsp < 2:
        return
    _mma.remember("nf", nf_mma_kernel[(cache.k_packed.shape[0] * cache.k_packed.shape[1], nsp - 1)](
        *_nf_args(q, cache, mp, lp, ap, per, nsp, scale, lens), **_nf_consts(q, cache, lens),
        **_mma.launch_options()))


__all__ = ["PREFETCH", "nf_mma_supported", "nf_split", "launch_nf_mma", "nf_mma_reference", "nf_compiled_counts"]
