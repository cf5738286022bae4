"""GQA decode attention over a Coupled Quantization cache (``CQCache``: 32 groups of 4 channels, 8-bit codes, head dim
128, per-head codebooks) with tensor cores for both products, the codebooks gathered from shared memory and pre-RoPE
keys rotated in registers (Gluon, sm_80+).

``decode_mma_pq``'s scheme with ``decode_mma_kvquant``'s rotation: both codebooks of the program's KV head (32 x 256
entries of 4 fp16 channels, 64 KiB each) are copied into shared memory once (``decode_mma_pq._fill``), and each
thread gathers with ``ld.shared.v2`` the entries its ``mma.sync`` fragments hold.

* **Keys** (B operand, rows in ``kvq_key_map`` order): lane ``t`` holds channels ``16 t ..`` of both halves of the
  head, that is groups ``4 t + kl`` and ``16 + 4 t + kl``: byte ``kl`` of word ``t`` of each half row (one word a
  half, as kvquant's 2-bit keys). An entry is two B registers (channels ``4 g, 4 g + 1`` and ``4 g + 2, 4 g + 3``),
  and the entries of a rotation pair's two halves are rotated by the key's angle inside its warp's 32 tokens
  (``decode_mma_kvquant.rope_tables``; the query is rotated back by each warp's first token once a tile).
* **Values** (B operand, ``decode_mma_pq.pq_value_map`` order): lane group ``g`` holds channels ``16 g ..``, groups
  ``4 g ..``: word ``g`` of a token's row. Two tokens' entries make four B registers by ``prmt``.
* Softmax, tiles, outputs and the fp16 segments as ``decode_mma_pq`` (8 warps by 32 tokens, one program an SM).
* Each tile's code words are loaded a tile ahead (``PREFETCH``): one program an SM leaves no other warps to hide
  their latency (H200, 128K: 155 -> 121 µs; ``docs/results/kernels-decode-attention.md``, session 16).

``cq_mma_reference`` is the algebra in PyTorch (operand orders, the two rotations, fp16 operands), checked against
``vq_reference`` on the CPU; the CPU tests compile the program for sm_90, the GPU tests run it.

Public: ``cq_mma_supported(q, cache)``, ``cq_split(q, cache)``, ``launch_cq_mma(...)``, ``cq_mma_reference``,
``cq_maps``, ``cq_compiled_counts``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import decode_mma as _mma
from .decode_mma import gluon
from .decode_mma_kvquant import KVQ_BLOCK, kvq_key_map, rope_tables
from .decode_mma_pq import launch_shared, pq_value_map, shared_split

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .decode_mma import (
        _in_split,
        _mma_layout,
        _online,
        _program,
        _score_tokens,
        _tile_offsets,
        _token_pairs,
        _words_layout,
    )
    from .decode_mma_kvquant import (
        _arrange_keys,
        _half_offsets,
        _half_words_layout,
        _ktable_offsets,
        _operand_row,
        _qtable_offsets,
        _query16,
        _rotate,
        _split8,
    )
    from .decode_mma_pq import _fill, _split_out

#: warps a program (tiles of 32 W tokens; one program an SM, as ``decode_mma_pq``)
CQ_WARPS = 8
#: load each tile's code words a tile ahead (in flight during the previous tile's math): with one program of 8 warps
#: an SM, nothing else hides their latency (ncu at 128K without it: 40% of the stalls wait on them)
PREFETCH = True
_SPLIT: dict = {}


def cq_tile() -> int:
    """Tokens a tile."""
    return CQ_WARPS * KVQ_BLOCK


def cq_maps(device) -> Tensor:
    """int32 ``(2, 128)``: key channel (``kvq_key_map``), value channel (``pq_value_map``), made once per device."""
    return _mma.channel_maps(("cq",), device, lambda i: [kvq_key_map(i), pq_value_map(i)])


def cq_mma_supported(q: Tensor, cache) -> bool:
    """``decode_mma.gluon_ready``, a ``CQCache`` of head dim 128 in 32 groups of 4 channels with 8-bit codes and
    per-head codebooks, room for a tile, 2 to 16 query heads a KV head."""
    if not _mma.gluon_ready(q) or cache.head_dim != 128 or cache.ck.shape[-1] != 4 or cache.bits != 8:
        return False
    h = cache.k_codes.shape[1]
    return (1 < q.shape[1] // h <= 16 and cache.k_codes.shape[2] >= cq_tile() and cache.k_codes.shape[3] == 32
            and cache.ck.dim() == 4 and cache.ck.shape[0] == h and cache.cv.shape == cache.ck.shape)


def cq_frequencies(cache, device) -> Tensor:
    """RoPE inverse frequencies ``(D/2,)`` float32 of pre-RoPE keys (``decode_attention._frequencies``, as kvquant's),
    zeros (no rotation) for post-RoPE ones; made once per source, not with small kernels every decode step."""
    from .decode_attention import _cached, _frequencies

    if cache.pre_rope:
        return _frequencies(cache, device)
    return _cached(("no rope", cache.head_dim, str(device)), (),
                   lambda: torch.zeros(cache.head_dim // 2, device=device))


# ----------------------------------------------------------------------------------------------- PyTorch mirror
def cq_mma_reference(q: Tensor, cache, sm_scale: float | None = None) -> Tensor:
    """The program's algebra in PyTorch over the packed tokens only: fp16 key entries rotated by their angle inside
    their warp's 32 tokens (fp16 tables), the fp16 query rotated back by each warp's first token, both in
    ``kvq_key_map`` order; fp16 probabilities; value columns in ``pq_value_map`` order -> ``(B, H*G, 128)`` float32.
    Against ``vq_reference`` it checks the maps and the rotations."""
    from .vq_reference import cq_decode_codes, unpack_vq_codes

    b, h = cache.k_codes.shape[:2]
    n = cache.n_packed
    g = q.shape[1] // h
    scale = 1.0 / 128 ** 0.5 if sm_scale is None else sm_scale
    kch, vch = cq_maps(q.device).long()
    k = cq_decode_codes(unpack_vq_codes(cache.k_codes[:, :, :n], 8, 32), cache.ck.half()).half().float()
    v = cq_decode_codes(unpack_vq_codes(cache.v_codes[:, :, :n], 8, 32), cache.cv.half())[..., vch]
    qt, kt = rope_tables(cq_frequencies(cache, q.device), cache.n_sink, n // KVQ_BLOCK + 1)
    j = torch.arange(n, device=q.device) % KVQ_BLOCK
    c, s = kt[0, j].float(), kt[1, j].float()  # (n, 64): the in-warp angle of each token
    k1, k2 = k[..., :64], k[..., 64:]
    kr = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], -1).half().float()[..., kch]  # (B, H, n, 128)
    q16 = (q.float() * scale).half().float().view(b, h, g, 128)
    w = torch.arange(n, device=q.device) // KVQ_BLOCK
    qc, qs = qt[0, w].float(), qt[1, w].float()  # (n, 128): [cos, cos], [sin, -sin]
    qp = torch.cat([q16[..., 64:], q16[..., :64]], -1)  # the rotation partner of each channel
    qr = (q16[:, :, :, None] * qc + qp[:, :, :, None] * qs).half().float()[..., kch]  # (B, H, G, n, 128)
    p = torch.softmax(torch.einsum("bhgnk,bhnk->bhgn", qr, kr), -1)
    acc = torch.einsum("bhgn,bhnc->bhgc", p.half().float(), v)
    return _mma.value_channels(acc, vch)


# ----------------------------------------------------------------------------------------------- Gluon program
if gluon is not None:
    @gluon.constexpr_function
    def _ckey_asm(kl):
        """Byte ``kl`` of half-row words ``$8`` (groups ``4 t + kl``) and ``$9`` (``16 + 4 t + kl``): both entries
        (``$10`` = the lane's byte offset ``8 t`` KiB), each half's slot ``2 kl`` rotated by ``$11, $12`` (cos, sin)
        and slot ``2 kl + 1`` by ``$13, $14`` -> fp16 ``$0..$3`` (slot ``2 kl``: low half pair, high half pair) and
        ``$4..$7``."""
        rot = ("mul.rn.f16x2 t, {h}, {s}; neg.f16x2 t, t; fma.rn.f16x2 i, {l}, {c}, t; "
               "mul.rn.f16x2 t, {l}, {s}; fma.rn.f16x2 j, {h}, {c}, t; mov.b32 {{${a}, ${b}}}, i; "
               "mov.b32 {{${x}, ${y}}}, j; ")
        return ("{.reg .b32 c, d, e0, e1, f0, f1, t, i, j, g; mov.b32 g, global_smem; add.u32 g, g, $10; "
                f"bfe.u32 c, $8, {8 * kl}, 8; mad.lo.u32 c, c, 8, g; ld.shared.v2.b32 {{e0, e1}}, [c+{kl * 2048}]; "
                f"bfe.u32 d, $9, {8 * kl}, 8; mad.lo.u32 d, d, 8, g; "
                f"ld.shared.v2.b32 {{f0, f1}}, [d+{32768 + kl * 2048}]; "
                + rot.format(l="e0", h="f0", c="$11", s="$12", a=0, b=1, x=2, y=3)
                + rot.format(l="e1", h="f1", c="$13", s="$14", a=4, b=5, x=6, y=7) + "}")

    @gluon.jit
    def _ckey_byte(lo, hi, base, c0, s0, c1, s1, KL: gl.constexpr):
        """Slots ``2 KL`` and ``2 KL + 1`` of a tile's keys -> two ``(W, NP, BN, e, kh)`` fp16."""
        r = gl.inline_asm_elementwise(_ckey_asm(KL), "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r",
                                      [lo, hi, base, c0, s0, c1, s1], dtype=(gl.float16,) * 8, is_pure=False,
                                      pack=1)
        return gl.join(gl.join(r[0], r[1]), gl.join(r[2], r[3])), gl.join(gl.join(r[4], r[5]), gl.join(r[6], r[7]))

    @gluon.jit
    def _cq_keys(lo, hi, kbase, cs, sn, W: gl.constexpr, BN: gl.constexpr, kb: gl.constexpr, L: gl.constexpr):
        """Half-row words ``lo, hi (W, 4, BN)`` and the in-warp rotation ``cs, sn (W, 4, BN, 8)`` -> the B operand
        ``(W, 128, BN)`` fp16 in ``kvq_key_map`` order."""
        c0, c1, c2, c3, c4, c5, c6, c7 = _split8(gl.reshape(cs, [W, 4, BN, 2, 2, 2]))
        n0, n1, n2, n3, n4, n5, n6, n7 = _split8(gl.reshape(sn, [W, 4, BN, 2, 2, 2]))
        x0, x1 = _ckey_byte(lo, hi, kbase, gl.convert_layout(c0, L), gl.convert_layout(n0, L),
                            gl.convert_layout(c1, L), gl.convert_layout(n1, L), 0)
        x2, x3 = _ckey_byte(lo, hi, kbase, gl.convert_layout(c2, L), gl.convert_layout(n2, L),
                            gl.convert_layout(c3, L), gl.convert_layout(n3, L), 1)
        x4, x5 = _ckey_byte(lo, hi, kbase, gl.convert_layout(c4, L), gl.convert_layout(n4, L),
                            gl.convert_layout(c5, L), gl.convert_layout(n5, L), 2)
        x6, x7 = _ckey_byte(lo, hi, kbase, gl.convert_layout(c6, L), gl.convert_layout(n6, L),
                            gl.convert_layout(c7, L), gl.convert_layout(n7, L), 3)
        x = gl.join(gl.join(gl.join(x0, x1), gl.join(x2, x3)), gl.join(gl.join(x4, x5), gl.join(x6, x7)))
        return _arrange_keys(x, W, BN, 2, kb)

    @gluon.constexpr_function
    def _cvalue_asm(x):
        """Code byte ``x`` of two tokens' words ``$8, $9`` (group ``4 g + x``; ``$10`` = ``8 g`` KiB plus the keys'
        64 KiB) -> channel ``q`` of both tokens for ``q = 0..3``: ``$2q, $2q+1``."""
        return ("{.reg .b32 c, d, e0, e1, f0, f1, g; mov.b32 g, global_smem; add.u32 g, g, $10; "
                f"bfe.u32 c, $8, {8 * x}, 8; mad.lo.u32 c, c, 8, g; ld.shared.v2.b32 {{e0, e1}}, [c+{2048 * x}]; "
                f"bfe.u32 d, $9, {8 * x}, 8; mad.lo.u32 d, d, 8, g; ld.shared.v2.b32 {{f0, f1}}, [d+{2048 * x}]; "
                "prmt.b32 c, e0, f0, 0x5410; prmt.b32 d, e0, f0, 0x7632; mov.b32 {$0, $1}, c; mov.b32 {$2, $3}, d; "
                "prmt.b32 c, e1, f1, 0x5410; prmt.b32 d, e1, f1, 0x7632; mov.b32 {$4, $5}, c; mov.b32 {$6, $7}, d;}")

    @gluon.jit
    def _cventries(a, b, base, X: gl.constexpr):
        """Code byte ``X`` of token pairs' words -> ``(..., pair, q0, q1)`` fp16 (channel ``q`` of the group)."""
        e = gl.inline_asm_elementwise(_cvalue_asm(X), "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [a, b, base],
                                      dtype=(gl.float16,) * 8, is_pure=False, pack=1)
        return gl.join(gl.join(gl.join(e[0], e[1]), gl.join(e[2], e[3])),
                       gl.join(gl.join(e[4], e[5]), gl.join(e[6], e[7])))

    @gluon.jit
    def _cq_values(vw, vbase, W: gl.constexpr, BN: gl.constexpr, kb: gl.constexpr):
        """Value words ``(W, BN, 8)`` -> the B operand ``(W, BN, 128)``, columns in ``pq_value_map`` order."""
        a, b = _token_pairs(vw, W, BN, 8)
        ba, _ = _token_pairs(vbase, W, BN, 8)
        y = gl.join(gl.join(_cventries(a, b, ba, 0), _cventries(a, b, ba, 1)),
                    gl.join(_cventries(a, b, ba, 2), _cventries(a, b, ba, 3)))  # [W, tp, g, pair, q0, q1, x0, x1]
        y = gl.permute(y, (0, 1, 3, 7, 6, 5, 4, 2))  # [W, tp, pair, x1, x0, q1, q0, g]
        return gl.convert_layout(gl.reshape(y, [W, BN, 128]), kb)

    @gluon.jit
    def _cq_words(KC, VC, base, koff, voff):
        """One tile's key half-row words and value words (8 words a token), its first token at row ``base``."""
        return gl.load(KC + base * 8 + koff), gl.load(KC + base * 8 + 4 + koff), gl.load(VC + base * 8 + voff)

    @gluon.jit
    def cq_mma_kernel(Q, sqb, sqh, KC, VC, CK, CV, QT, tab_rows, KT, MAPS, MP, LP, AP, H, Tmax, n_packed,
                      tokens_per_split, NSP, qk_scale, zero, LENS, G: gl.constexpr, W: gl.constexpr,
                      PF: gl.constexpr = True, DYN: gl.constexpr = False):
        """Program ``(b * H + h, sp)``: query heads ``h G ..`` of batch ``b`` over split ``sp`` of the packed tokens
        (``NSP - 1`` packed splits), ``KC, VC`` the code rows as int32 words (8 a token), ``CK, CV (H, 16384)`` the
        fp16 codebooks as int32 pairs, ``QT (2, tab_rows, 128)`` fp16 and ``KT (2, 64, 32)`` fp16 pairs as int32 the
        rotations (``rope_tables``), ``MAPS`` the ``cq_maps``; ``zero`` is 0.0 (it keeps the 128 KiB allocation).
        ``PF``: each tile's code words are loaded a tile ahead (``PREFETCH``); ``DYN``: the packed count read from
        ``LENS`` and the split made here (``decode_mma._program``)."""
        BN: gl.constexpr = 32
        pid, sp, b, h, start, end = _program(H, LENS, n_packed, tokens_per_split, NSP, W * BN, DYN)
        m3: gl.constexpr = _mma_layout(W)
        qa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
        kb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
        rows: gl.constexpr = gl.SliceLayout(2, m3)
        hw: gl.constexpr = _half_words_layout(W, BN, 2, 1)
        hws: gl.constexpr = _half_words_layout(W, BN, 2, 8)
        vwl: gl.constexpr = _words_layout(W, BN, False, 2)
        qk_l: gl.constexpr = gl.SliceLayout(1, qa)
        q16 = _query16(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa)
        x = gl.split(gl.permute(gl.reshape(q16, [W, 16, 2, 64]), (0, 1, 3, 2)))  # (k < 64, k >= 64)
        q16p = gl.convert_layout(gl.reshape(gl.permute(gl.join(x[1], x[0]), (0, 1, 3, 2)), [W, 16, 128]), qa)
        qtoff = _qtable_offsets(W)
        ctoff = _ktable_offsets(W, BN, 4, 8, hws)  # (W, 4, BN, 8): pair index of row n
        koff = _half_offsets(W, BN, 8, hw)
        voff = _tile_offsets(W, BN, 8, 1, vwl)
        kbase = (koff % 8) * 8192  # lane t: groups 4 t ..
        vbase = (voff % 8) * 8192 + 65536  # word g: groups 4 g ..
        ct = _score_tokens(W, BN, m3)
        row = pid.to(gl.int64) * Tmax
        last = Tmax - W * BN
        m_i = gl.full([W, 16], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([W, 16], gl.float32, rows)
        acc = gl.zeros([W, 16, 128], gl.float32, m3)
        if PF:  # the first tile's code words in flight during the fill
            nxt = _cq_words(KC, VC, row + gl.minimum(start, last), koff, voff)
        _fill(CK + h * 16384, CV + h * 16384, W)
        for t0 in range(start, end, W * BN):
            t0c = gl.minimum(t0, last)
            base = row + t0c
            if PF:  # this tile's words were loaded a tile ago; the next tile's go in flight now
                lo, hi, vw = nxt
                nxt = _cq_words(KC, VC, row + gl.minimum(t0 + W * BN, last), koff, voff)
            else:
                lo, hi, vw = _cq_words(KC, VC, base, koff, voff)
            qc = _operand_row(gl.load(QT + (t0c // BN) * 128 + qtoff), W, qk_l)
            qs = _operand_row(gl.load(QT + (tab_rows + t0c // BN) * 128 + qtoff), W, qk_l)
            valid = _in_split(ct, t0, t0c, end)
            qc, _ = gl.broadcast(qc[:, None, :], q16)
            qs, _ = gl.broadcast(qs[:, None, :], q16)
            qr = _rotate(q16, q16p, qc, qs)
            cs = gl.load(KT + (t0c % BN) * 32 + ctoff)
            sn = gl.load(KT + 64 * BN + (t0c % BN) * 32 + ctoff)
            s = mma_v2(qr, _cq_keys(lo, hi, kbase, cs, sn, W, BN, kb, hw), gl.zeros([W, 16, BN], gl.float32, m3))
            s = gl.where(valid[:, None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online(s, m_i, l_i)
            acc = mma_v2(gl.convert_layout(p.to(gl.float16), qa), _cq_values(vw, vbase, W, BN, kb),
                         acc * alpha[:, :, None])
        _split_out(MP, LP, AP, MAPS, b, h, H, NSP, sp, m_i, l_i, acc, zero, G, W, m3, rows)


def cq_compiled_counts(g: int = 4, warps: int = CQ_WARPS, sass: bool = False, pf: bool | None = None,
                       dyn: bool = False) -> dict:
    """As ``decode_mma.compiled_counts``, for this program (``pf``: ``PREFETCH`` when None; ``dyn``: counts on the
    device)."""
    from .decode_mma import _compile_counts

    sig = dict(Q="*fp16", KC="*i32", VC="*i32", CK="*i32", CV="*i32", QT="*fp16", KT="*i32", MAPS="*i32",
               MP="*fp32", LP="*fp32", AP="*fp32", qk_scale="fp32", zero="fp32", LENS="*i64")
    aligned = ("Q", "sqb", "sqh", "KC", "VC", "CK", "CV", "QT", "KT", "MAPS", "MP", "LP", "AP", "Tmax",
               "tokens_per_split")
    consts = dict(G=g, W=warps, PF=PREFETCH if pf is None else pf, DYN=dyn)
    return _compile_counts(cq_mma_kernel, sig, consts, aligned, warps, sass)


def _operands(q: Tensor, cache) -> tuple:
    """(ck, cv as int32 ``(H, 16384)``, qt, kt as int32) for a launch, made once per source
    (``decode_attention._cached``)."""
    from .decode_attention import _cached

    books = _cached(("cq-codebooks", id(cache.ck), id(cache.cv)), (cache.ck, cache.cv),
                    lambda: tuple(c.to(torch.float16).contiguous().view(torch.int32).reshape(c.shape[0], -1)
                                  for c in (cache.ck, cache.cv)))
    rows = (cache.k_codes.shape[2] + KVQ_BLOCK - 1) // KVQ_BLOCK + 1
    invf = cq_frequencies(cache, q.device)  # the key of kvquant's tables: the same frequencies share them
    qt, kt = _cached(("rope", id(invf), cache.n_sink, rows), (invf,), lambda: rope_tables(invf, cache.n_sink, rows))
    return (*books, qt, kt.view(torch.int32))


def _cq_args(q: Tensor, cache, mp, lp, ap, per: int, nsp: int, scale: float, lens: Tensor | None = None) -> tuple:
    ck, cv, qt, kt = _operands(q, cache)
    return (q, q.stride(0), q.stride(1), cache.k_codes.view(torch.int32), cache.v_codes.view(torch.int32), ck, cv,
            qt, qt.shape[1], kt, cq_maps(q.device), mp, lp, ap, cache.k_codes.shape[1], cache.k_codes.shape[2],
            cache.n_packed, per, nsp, scale, 0.0, q if lens is None else lens)


def cq_split(q: Tensor, cache, lens: Tensor | None = None) -> tuple[int, int]:
    """(tokens a tile, programs an SM): what the compiled program's registers and shared memory let an SM hold."""
    f32 = torch.float32
    return cq_tile(), shared_split(cq_mma_kernel, lambda: _cq_args(q, cache, f32, f32, f32, cq_tile(), 2, 1.0, lens),
                                   q.shape[1] // cache.k_codes.shape[1], CQ_WARPS, _SPLIT, q.device, PF=PREFETCH,
                                   DYN=lens is not None)


def launch_cq_mma(q: Tensor, cache, mp: Tensor, lp: Tensor, ap: Tensor, per: int, nsp: int, scale: float,
                  lens: Tensor | None = None) -> None:
    """Splits ``0 .. nsp - 2`` of ``cq_decode``'s plan (``per`` a multiple of ``cq_tile()``) into the partial
    buffers; the last split (the fp16 segments) is ``cq_decode``'s. ``lens``: the counts on the device."""
    b, h = cache.k_codes.shape[:2]
    launch_shared("cq", cq_mma_kernel, _cq_args(q, cache, mp, lp, ap, per, nsp, scale, lens), q.shape[1] // h,
                  CQ_WARPS, b * h, nsp, PF=PREFETCH, DYN=lens is not None)


__all__ = ["CQ_WARPS", "PREFETCH", "cq_tile", "cq_mma_supported", "cq_split", "launch_cq_mma",
           "cq_mma_reference", "cq_maps", "cq_compiled_counts", "cq_frequencies"]
