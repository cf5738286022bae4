"""GQA decode attention over 2-bit ``int`` codes with both tensor-core operands made in registers (Gluon, sm_80+).

The ``tl.dot`` programs of ``decode_token`` dequantize a tile, and Triton stages it through shared memory to make
it an MMA operand: on the H200 those programs are bound by that staging (``kernels-decode-attention.md``, session
10). This program is written in Gluon, Triton's explicit-layout dialect, so that every thread loads the very codes
that its ``mma.sync`` fragments hold and turns them into fp16 operands with bit tricks. The cache is read as it is
stored (``TokenCache``: channels in order, 4 codes a byte LSB first, one fp16 scale ``s`` and zero ``z`` a
token-head); only the order in which the program consumes channels and tokens is its own.

* **Keys** (B operand, ``k`` = channel, ``n`` = token). A 32-bit word holds channels ``16 j + i`` at bits ``2 i``
  and ``16 j + 8 + i`` at bits ``16 + 2 i``. ``w & (0x00030003 << 2 i) | 0x64006400`` (after ``w >> 10`` for
  ``i >= 5``) read as two fp16 is ``1024 + f c`` for both channels, ``f = 4^i`` (``4^(i-5)``): a B register as it
  stands. The query is read in the same channel order (``key_channel``) and divided by ``f`` (exact), so the MMA
  gives ``1024 sum(q') + q . c`` and ``q . k = s (mma - 1024 sum(q')) + z sum(q)``.
* **Values** (B operand, ``k`` = token, ``n`` = channel). ``prmt`` puts byte ``x`` of two tokens' words side by
  side; the same mask-and-or gives ``1024 + 4^j c`` of channel ``16 g + 4 x + j`` for both tokens. The
  probabilities are weighted by the value scale before the MMA (``p' = p s``); ``u = sum(p')`` and
  ``zs = sum(p z)`` are kept per query row, and ``out = (mma - 1024 u) / 4^j + zs`` (``value_channel``).

One program: a (batch, KV head) row's ``G <= 16`` query heads (the MMA rows) over one split of the packed tokens,
in tiles of ``W`` warps by ``BN`` tokens; warp ``w`` takes the w-th ``BN`` tokens of a tile (warps on the batch
axis of a 3-d ``mma_v2``, so the softmax needs no cross-warp traffic until the split's end), and the next tile's
loads are issued before this tile's math. It writes the split's ``m, l`` and unnormalized ``acc`` as the other split
programs do; ``decode_token``'s program does the fp16 sink and residual split (``SEG_ONLY``) and ``_finish`` merges.

There is no CPU interpreter for Gluon: the CPU tests compile this for sm_90 (its token loop has no shared-memory
instruction) and check the algebra with ``mma_reference``, the PyTorch mirror of the operands; the GPU tests run it.

Public: ``mma_supported(q, cache)``, ``mma_tile()``, ``launch_mma(q, cache, mp, lp, ap, per, nsp, scale, lens)``,
``mma_reference(q, cache, sm_scale)``, ``key_channel``, ``value_channel``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # a Triton without Gluon (< 3.5): the tl.dot programs run instead
    gluon = None

#: warps a program and tokens a warp (a tile is W * BN tokens), programs an SM: H200, 128K, Llama-3-8B heads
#: (``bench/bench_int_mma.py``, ``docs/results/kernels-decode-attention.md``, session 11)
WARPS, BLOCK, PROGRAMS_PER_SM = 2, 32, 4


def mma_tile() -> int:
    """Tokens a tile (the split plan's block): ``WARPS * BLOCK``."""
    return WARPS * BLOCK


# ----------------------------------------------------------------------------------------------- index maps
def key_channel(k: Tensor) -> Tensor:
    """Channel of row ``k`` (0..127) of the key operand: ``k = hi + 2 w1 + 4 w2 + 8 w0 + 16 i`` for word
    ``w = 4 w2 + 2 w1 + w0`` and its code ``i + 8 hi``."""
    w = 4 * ((k >> 2) & 1) + 2 * ((k >> 1) & 1) + ((k >> 3) & 1)
    return 16 * w + 8 * (k & 1) + (k >> 4)


def key_factor(k: Tensor) -> Tensor:
    """``f`` of key operand row ``k``: ``4^i`` for code ``i < 5`` of its half-word, ``4^(i - 5)`` after the shift."""
    i = k >> 4
    return torch.where(i < 5, 1 << (2 * i), 1 << (2 * (i - 5)))


def value_channel(n: Tensor) -> Tensor:
    """Channel of column ``n`` (0..127) of the value operand: ``n = g + 8 j + 32 x`` is channel ``16 g + 4 x + j``
    (word ``g``, byte ``x``, code ``j``); its factor is ``4^j``."""
    return 16 * (n & 7) + 4 * ((n >> 5) & 3) + ((n >> 3) & 3)


# ----------------------------------------------------------------------------------------------- the gate
def mma_supported(q: Tensor, cache) -> bool:
    """Whether this program runs ``q`` against ``cache``: a CUDA GPU of compute capability 8.0+, Gluon, a 2-bit
    ``int`` cache (zero points, no level table) of head dim 128 and room for a tile, 2 to 16 query heads a KV
    head."""
    if gluon is None or not q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    h = cache.k_packed.shape[1]
    g = q.shape[1] // h
    return (cache.bits == 2 and cache.head_dim == 128 and cache.k_zero is not None and cache.levels is None
            and 1 < g <= 16 and cache.k_packed.shape[2] >= mma_tile()
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


# ----------------------------------------------------------------------------------------------- PyTorch mirror
def _as_f16(bits: Tensor) -> tuple[Tensor, Tensor]:
    """int64 32-bit patterns -> their two fp16 halves (low, high), as float32."""
    return _u16_f16(bits & 0xFFFF), _u16_f16((bits >> 16) & 0xFFFF)


def _u16_f16(u: Tensor) -> Tensor:
    """16-bit patterns (in int64) -> their fp16 values as float32."""
    return (u - (u >= 0x8000).to(u.dtype) * 0x10000).to(torch.int16).view(torch.float16).float()


def mma_reference(q: Tensor, cache, sm_scale: float | None = None) -> Tensor:
    """The program's algebra in PyTorch over the packed tokens only (no fp16 segments): the operands made from the
    words by the same bit tricks and index maps, the same corrections -> ``(B, H*G, 128)`` float32. It checks
    ``key_channel``, ``key_factor`` and ``value_channel`` against ``token_reference`` on the CPU."""
    b, h, _, nb = cache.k_packed.shape
    n = cache.n_packed
    g = q.shape[1] // h
    scale = (1.0 / 128 ** 0.5 if sm_scale is None else sm_scale)
    words = [x[:, :, :n].contiguous().view(torch.int32).to(torch.int64) for x in (cache.k_packed, cache.v_packed)]
    kw, vw = words  # (B, H, n, 8)
    k = torch.arange(128, device=q.device)
    ch, f = key_channel(k), key_factor(k).float()
    # keys: operand row k of token t = half (k & 1) of field i of word w
    i, hi = (k >> 4), (k & 1)
    w = 4 * ((k >> 2) & 1) + 2 * ((k >> 1) & 1) + ((k >> 3) & 1)
    shift = torch.where(i < 5, 0, 10)
    mask = 0x00030003 << torch.where(i < 5, 2 * i, 2 * (i - 5))
    lo, hi_v = _as_f16((kw[..., w] >> shift) & mask | 0x64006400)  # (B, H, n, 128) each
    kop = torch.where(hi.bool(), hi_v, lo)  # 1024 + f c
    qs = (q.float() * scale).view(b, h, g, 128)
    qp = (qs[..., ch] / f).half().float()  # the operand query, in key-operand order
    mma = torch.einsum("bhgk,bhnk->bhgn", qp, kop)
    a_row = 1024 * qp.sum(-1, keepdim=True)
    b_row = qs.half().float().sum(-1, keepdim=True)
    ks, kz = cache.k_scale[:, :, :n].float(), cache.k_zero[:, :, :n].float()
    scores = ks[:, :, None, :] * (mma - a_row) + kz[:, :, None, :] * b_row
    p = torch.softmax(scores, -1)
    # values: operand column n of token t = byte x, field j of word g: 1024 + 4^j c
    nn = k
    gw, x, j = nn & 7, (nn >> 5) & 3, (nn >> 3) & 3
    byte = (vw[..., gw] >> (8 * x)) & 0xFF
    vop = 1024 + (4 ** j) * ((byte >> (2 * j)) & 3)
    vs, vz = cache.v_scale[:, :, :n].float(), cache.v_zero[:, :, :n].float()
    pf = (p * vs[:, :, None, :]).half().float()
    acc = torch.einsum("bhgn,bhnc->bhgc", pf, vop.float())
    out_n = (acc - 1024 * pf.sum(-1, keepdim=True)) / (4.0 ** j) + (p * vz[:, :, None, :]).sum(-1, keepdim=True)
    out = torch.empty_like(out_n)
    out[..., value_channel(nn)] = out_n
    return out.reshape(b, h * g, 128)


# ----------------------------------------------------------------------------------------------- Gluon program
if gluon is not None:
    @gluon.constexpr_function
    def _warp_bases(w):
        return [[1 << i, 0, 0] for i in range(w.bit_length() - 1)]

    @gluon.constexpr_function
    def _words_layout(w, bn, keys):
        """Who loads which words: keys ``(W, 8 words, BN tokens)``, a thread 2 adjacent words of 1 token in 8;
        values ``(W, BN tokens, 8 words)``, a thread word ``g`` of 2 adjacent tokens (and + 8, + 16)."""
        def at(axis, v):
            return [v if a == axis else 0 for a in range(3)]

        extra = bn.bit_length() - 4  # token bits past the 3 lane bits (keys) / the pair and 2 lane bits (values)
        if keys:
            regs = [at(1, 1)] + [at(2, 8 << e) for e in range(extra)]
            lanes = [at(1, 2), at(1, 4), at(2, 1), at(2, 2), at(2, 4)]
            shape = [w, 8, bn]
        else:
            regs = [at(1, 1)] + [at(1, 8 << e) for e in range(extra)]
            lanes = [at(1, 2), at(1, 4), at(2, 1), at(2, 2), at(2, 4)]
            shape = [w, bn, 8]
        return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=_warp_bases(w),
                                          block_bases=[], shape=shape)

    @gluon.constexpr_function
    def _pair_asm(mask, shift):
        pre = "" if shift == 0 else f"shr.b32 t, $2, {shift}; "
        src = "$2" if shift == 0 else "t"
        return "{.reg .b32 t; " + pre + f"lop3.b32 t, {src}, {mask}, 0x64006400, 0xea; mov.b32 {{$0, $1}}, t;}}"

    @gluon.constexpr_function
    def _vpair_asm(x, j):
        sel = x | (x << 4) | ((4 + x) << 8) | ((4 + x) << 12)
        return (f"{{.reg .b32 t; prmt.b32 t, $2, $3, {sel}; lop3.b32 t, t, {0x00030003 << (2 * j)}, 0x64006400, "
                "0xea; mov.b32 {$0, $1}, t;}")

    @gluon.jit
    def _kfield(w, I: gl.constexpr):
        """fp16 ``1024 + f c`` of channels ``16 j + I`` and ``16 j + 8 + I`` of words ``w``, joined (minor axis)."""
        if I < 5:
            lo, hi = gl.inline_asm_elementwise(_pair_asm(0x00030003 << (2 * I), 0), "=h,=h,r", [w],
                                               dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(_pair_asm(0x00030003 << (2 * (I - 5)), 10), "=h,=h,r", [w],
                                               dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _keys(kw, W: gl.constexpr, BN: gl.constexpr, kb: gl.constexpr):
        """K words ``(W, 8, BN)`` -> the B operand ``(W, 128, BN)`` (rows: ``key_channel``)."""
        x = gl.join(gl.join(gl.join(_kfield(kw, 0), _kfield(kw, 1)), gl.join(_kfield(kw, 2), _kfield(kw, 3))),
                    gl.join(gl.join(_kfield(kw, 4), _kfield(kw, 5)), gl.join(_kfield(kw, 6), _kfield(kw, 7))))
        x = gl.reshape(x, [W, 2, 2, 2, BN, 2, 2, 2, 2])  # [W, w2, w1, w0, n, hi, i0, i1, i2]
        x = gl.permute(x, (0, 8, 7, 6, 3, 1, 2, 5, 4))  # [W, i2, i1, i0, w0, w2, w1, hi, n]
        return gl.convert_layout(gl.reshape(x, [W, 128, BN]), kb)

    @gluon.jit
    def _vfield(a, b, X: gl.constexpr):
        """Channels ``16 g + 4 X + j`` (j = 0..3) of token pairs ``(a, b)``, on minor axes ``[pair, j0, j1]``."""
        return gl.join(gl.join(_vpair(a, b, X, 0), _vpair(a, b, X, 1)),
                       gl.join(_vpair(a, b, X, 2), _vpair(a, b, X, 3)))

    @gluon.jit
    def _vpair(a, b, X: gl.constexpr, J: gl.constexpr):
        """Field ``J`` of byte ``X`` of words ``a`` and ``b`` -> fp16 ``1024 + 4^J c`` of both, joined."""
        lo, hi = gl.inline_asm_elementwise(_vpair_asm(X, J), "=h,=h,r,r", [a, b], dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _values(vw, W: gl.constexpr, BN: gl.constexpr, vb: gl.constexpr):
        """V words ``(W, BN, 8)`` -> the B operand ``(W, BN, 128)`` (columns: ``value_channel``)."""
        a, b = gl.split(gl.permute(gl.reshape(vw, [W, BN // 2, 2, 8]), (0, 1, 3, 2)))  # tokens 2 tp, 2 tp + 1
        y = gl.join(gl.join(_vfield(a, b, 0), _vfield(a, b, 1)), gl.join(_vfield(a, b, 2), _vfield(a, b, 3)))
        y = gl.reshape(y, [W, BN // 2, 2, 2, 2, 2, 2, 2, 2, 2])  # [W, tp, g2, g1, g0, pair, j0, j1, x0, x1]
        y = gl.permute(y, (0, 1, 5, 9, 8, 7, 6, 2, 3, 4))  # [W, tp, pair, x1, x0, j1, j0, g2, g1, g0]
        return gl.convert_layout(gl.reshape(y, [W, BN, 128]), vb)

    @gluon.jit
    def _tile_loads(KW, VW, KS, KZ, VS, VZ, base, koff, voff, ct):
        """One tile's K words, V words and per-token statistics (in the score layout), its first token at row
        ``base`` of the buffers: the offsets are the same for every tile, only the scalar base moves."""
        kw = gl.load(KW + base * 8 + koff)
        vw = gl.load(VW + base * 8 + voff)
        ks = gl.load(KS + base + ct)
        kz = gl.load(KZ + base + ct)
        vs = gl.load(VS + base + ct)
        vz = gl.load(VZ + base + ct)
        return kw, vw, ks, kz, vs, vz

    @gluon.jit
    def _safe(m):
        """Exponent base of a running max: 0 where no token was seen yet (-inf)."""
        return gl.where(m == float("-inf"), 0.0, m)

    @gluon.jit
    def int2_mma_kernel(Q, sqb, sqh, KW, KS, KZ, VW, VS, VZ, MP, LP, AP, H, Tmax, n_packed, tokens_per_split, NSP,
                        qk_scale, LENS, G: gl.constexpr, W: gl.constexpr, BN: gl.constexpr, DYN: gl.constexpr):
        """Program ``(b * H + h, sp)``: query heads ``h G ..`` of batch ``b`` over split ``sp`` of the packed tokens
        (``NSP - 1`` packed splits; ``DYN``: counts read from ``LENS`` and the split made here, as
        ``decode_split._counts``). Writes ``m, l`` and the unnormalized ``acc (128,)`` of each query head."""
        pid = gl.program_id(0)
        sp = gl.program_id(1)
        b = pid // H
        h = pid % H
        if DYN:
            npk = gl.load(LENS).to(gl.int32)
            per = gl.cdiv(gl.cdiv(npk, W * BN), NSP - 1) * (W * BN)
        else:
            npk = n_packed
            per = tokens_per_split
        start = sp * per
        end = gl.minimum(start + per, npk)
        m3: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
        qa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
        kb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
        rows: gl.constexpr = gl.SliceLayout(2, m3)
        kwl: gl.constexpr = _words_layout(W, BN, True)
        vwl: gl.constexpr = _words_layout(W, BN, False)
        # the query rows (zero past G), scaled, in key-operand channel order and divided by the factors
        qh = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, qa)))
        qk = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, qa)))
        qw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, qa)))
        wq = 4 * ((qk >> 2) & 1) + 2 * ((qk >> 1) & 1) + ((qk >> 3) & 1)
        qch = 16 * wq + 8 * (qk & 1) + (qk >> 4)
        qi = qk >> 4
        qf = gl.where(qi < 5, 1 << (2 * qi), 1 << (2 * (qi - 5))).to(gl.float32)
        qoff = qw[:, None, None] * 0 + (h * G + qh)[None, :, None] * sqh + qch[None, None, :]
        qmask = (qw[:, None, None] * 0 + qh[None, :, None]) < G
        qs = gl.load(Q + b.to(gl.int64) * sqb + qoff, mask=qmask, other=0.0).to(gl.float32) * qk_scale
        qp = (qs / qf[None, None, :]).to(gl.float16)
        a_row = gl.convert_layout(gl.sum(qp.to(gl.float32), 2) * 1024.0, rows)
        b_row = gl.convert_layout(gl.sum(qs.to(gl.float16).to(gl.float32), 2), rows)
        # tile offsets (tokens of warp w: w BN + n): K words, V words, statistics in the score layout
        koff = ((gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, kwl)))[:, None, None] * BN +
                 gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, kwl)))[None, None, :]) * 8 +
                gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, kwl)))[None, :, None])
        voff = ((gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, vwl)))[:, None, None] * BN +
                 gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(2, vwl)))[None, :, None]) * 8 +
                gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, vwl)))[None, None, :])
        ct = (gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(1, m3)))[:, None] * BN +
              gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, m3)))[None, :])
        row = pid.to(gl.int64) * Tmax
        last = Tmax - W * BN  # tiles start at or before it (Tmax >= W BN), so every read is inside the buffers
        m_i = gl.full([W, 16], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([W, 16], gl.float32, rows)
        u_i = gl.zeros([W, 16], gl.float32, rows)
        z_i = gl.zeros([W, 16], gl.float32, rows)
        acc = gl.zeros([W, 16, 128], gl.float32, m3)
        nxt = _tile_loads(KW, VW, KS, KZ, VS, VZ, row + gl.minimum(start, last), koff, voff, ct)
        for t0 in range(start, end, W * BN):
            kw, vw, ks, kz, vs, vz = nxt
            nxt = _tile_loads(KW, VW, KS, KZ, VS, VZ, row + gl.minimum(t0 + W * BN, last), koff, voff, ct)
            tok = gl.minimum(t0, last) + ct  # the tokens read: those in [t0, end) count
            valid = (tok >= t0) & (tok < end)
            vs = gl.where(valid, vs.to(gl.float32), 0.0)
            vz = gl.where(valid, vz.to(gl.float32), 0.0)
            s = mma_v2(qp, _keys(kw, W, BN, kb), gl.zeros([W, 16, BN], gl.float32, m3))
            s = ks.to(gl.float32)[:, None, :] * (s - a_row[:, :, None]) + \
                kz.to(gl.float32)[:, None, :] * b_row[:, :, None]
            s = gl.where(valid[:, None, :], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 2))
            base = _safe(m_new)
            alpha = gl.exp2(m_i - base)
            p = gl.exp2(s - base[:, :, None])
            l_i = l_i * alpha + gl.sum(p, 2)
            m_i = m_new
            pf = (p * vs[:, None, :]).to(gl.float16)
            u_i = u_i * alpha + gl.sum(pf.to(gl.float32), 2)
            z_i = z_i * alpha + gl.sum(p * vz[:, None, :], 2)
            acc = mma_v2(gl.convert_layout(pf, qa), _values(vw, W, BN, kb), acc * alpha[:, :, None])
        # the warps' states, once a split
        m_all = gl.max(m_i, 0)
        sc = gl.exp2(m_i - _safe(m_all)[None, :])
        l_all = gl.sum(l_i * sc, 0)
        nn = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
        vf = (1 << (2 * ((nn >> 3) & 3))).to(gl.float32)
        o = gl.sum((acc - 1024.0 * u_i[:, :, None]) * sc[:, :, None], 0) / vf[None, :]
        o = o + gl.convert_layout(gl.sum(z_i * sc, 0), gl.SliceLayout(1, gl.SliceLayout(0, m3)))[:, None]
        oh = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
        prow = (b.to(gl.int64) * H * G + h * G + oh) * NSP + sp
        och = 16 * (nn & 7) + 4 * ((nn >> 5) & 3) + ((nn >> 3) & 3)
        gl.store(AP + prow[:, None] * 128 + och[None, :], o, mask=(oh < G)[:, None])
        rr = gl.arange(0, 16, layout=gl.SliceLayout(0, rows))
        prow_r = (b.to(gl.int64) * H * G + h * G + rr) * NSP + sp
        gl.store(MP + prow_r, m_all, mask=rr < G)
        gl.store(LP + prow_r, l_all, mask=rr < G)


def compiled_counts(g: int = 4, dyn: bool = True, warps: int = WARPS, block: int = BLOCK) -> dict:
    """Compile the program for sm_90 on any machine (no GPU needed) -> PTX instruction counts of the whole kernel and
    of its token loop (the longest backward branch), registers per thread and shared bytes."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget

    try:
        from triton.experimental.gluon import GluonASTSource
    except ImportError:  # Triton 3.6
        from triton.experimental.gluon._runtime import GluonASTSource
    fn = int2_mma_kernel
    names = list(fn.arg_names)
    sig = {n: "i32" for n in names}
    sig.update(Q="*fp16", KW="*i32", KS="*fp16", KZ="*fp16", VW="*i32", VS="*fp16", VZ="*fp16", MP="*fp32",
               LP="*fp32", AP="*fp32", qk_scale="fp32", LENS="*i64")
    consts = dict(G=g, W=warps, BN=block, DYN=dyn)
    sig.update({k: "constexpr" for k in consts})
    aligned = ("Q", "sqb", "sqh", "KW", "KS", "KZ", "VW", "VS", "VZ", "MP", "LP", "AP", "Tmax", "tokens_per_split")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}  # what a launch specializes
    done = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    lines = done.asm["ptx"].splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L__BB\w+):", ln))}
    loop = (0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\w+);", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > loop[1] - loop[0]:
            loop = (labels[m.group(1)], i + 1)
    body = "\n".join(lines[loop[0]:loop[1]])
    pats = ("ld.shared", "st.shared", "bar.sync", "mma.sync", "ld.global", "cvt.rn.f16.u", "cvt.rn.f32.u")
    return dict(loop={p: body.count(p) for p in pats}, kernel={p: done.asm["ptx"].count(p) for p in pats},
                shared_bytes=done.metadata.shared)


def launch_mma(q: Tensor, cache, mp: Tensor, lp: Tensor, ap: Tensor, per: int, nsp: int, scale: float,
               lens: Tensor | None) -> None:
    """Splits ``0 .. nsp - 2`` of ``decode_token``'s plan (``per`` tokens each, a multiple of ``mma_tile()``;
    ``lens``: counts on the device) into the partial buffers ``mp, lp (B*Hq, nsp)``, ``ap (B*Hq, nsp, 128)``."""
    b, h, tmax, _ = cache.k_packed.shape
    if nsp < 2:
        return
    int2_mma_kernel[(b * h, nsp - 1)](
        q, q.stride(0), q.stride(1), cache.k_packed.view(torch.int32), cache.k_scale, cache.k_zero,
        cache.v_packed.view(torch.int32), cache.v_scale, cache.v_zero, mp, lp, ap, h, tmax, cache.n_packed, per, nsp,
        scale, q if lens is None else lens, G=q.shape[1] // h, W=WARPS, BN=BLOCK, DYN=lens is not None,
        num_warps=WARPS)
